// A form built from a JSON Schema object (an operation's request body in the OpenAPI
// document): one control per property, with its default, description and bounds, checked in
// the browser before sending, and the server's 422 details shown on the field they name.

export function deref(doc, schema) {
  while (schema && schema.$ref) {
    const [section, name] = schema.$ref.split("/").slice(-2);
    schema = doc.components[section][name];
  }
  return schema || {};
}

// One property reduced to what a control needs. A nullable field is anyOf [{type: T},
// {type: "null"}]: its T part, nullable. Several real alternatives (ideogram4's prompt is
// text or a caption object) become "mixed": text, sent as JSON when it parses as an object.
export function fieldSpec(doc, raw) {
  const schema = deref(doc, raw);
  const alternatives = schema.anyOf || schema.oneOf;
  if (!alternatives) return { ...schema, items: schema.items && deref(doc, schema.items) };
  const parts = alternatives.map((s) => deref(doc, s));
  const real = parts.filter((s) => s.type !== "null");
  const outer = { description: schema.description, default: schema.default, title: schema.title };
  const nullable = real.length < parts.length;
  if (real.length === 1) {
    const inner = real[0];
    return { ...inner, ...defined(outer), nullable, items: inner.items && deref(doc, inner.items) };
  }
  return { ...defined(outer), type: "mixed", nullable, alternatives: real };
}

const defined = (object) => Object.fromEntries(Object.entries(object).filter(([, v]) => v !== undefined));

const el = (tag, props = {}) => Object.assign(document.createElement(tag), props);

// -- field errors -------------------------------------------------------------------------
// The message sits right after the control, tied to it for screen readers.
export function markField(input, message) {
  const id = `${input.id}-error`;
  let note = document.getElementById(id);
  if (!message) {
    input.removeAttribute("aria-invalid");
    if (note) note.remove();
    return;
  }
  if (!note) {
    note = el("p", { id, className: "field-error" });
    note.setAttribute("role", "alert");
    (input.closest(".choices") || input).insertAdjacentElement("afterend", note);
  }
  note.textContent = message;
  input.setAttribute("aria-invalid", "true");
  input.setAttribute("aria-describedby", id);
}

// -- checks in the browser, worded like the server's -----------------------------------------
function checkNumber(spec, text) {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value)) return "must be a number";
  if (spec.type === "integer" && !Number.isInteger(value)) return "must be an integer";
  if (spec.minimum !== undefined && value < spec.minimum) return `must be at least ${spec.minimum}`;
  if (spec.maximum !== undefined && value > spec.maximum) return `must be at most ${spec.maximum}`;
  if (spec.exclusiveMinimum !== undefined && value <= spec.exclusiveMinimum) return `must be more than ${spec.exclusiveMinimum}`;
  if (spec.exclusiveMaximum !== undefined && value >= spec.exclusiveMaximum) return `must be less than ${spec.exclusiveMaximum}`;
  return "";
}

function checkString(spec, text) {
  if (spec.minLength !== undefined && text.length < spec.minLength) return `must have at least ${spec.minLength} character${spec.minLength > 1 ? "s" : ""}`;
  if (spec.maxLength !== undefined && text.length > spec.maxLength) return `must have at most ${spec.maxLength} characters`;
  if (spec.pattern && !new RegExp(spec.pattern, "u").test(text)) return `must match ${spec.pattern}`;
  return "";
}

// -- the form ---------------------------------------------------------------------------------
export class SchemaForm {
  // box: the element to fill; properties/required: the object schema's; skip: names the page
  // handles itself; models: choices for a "model" field.
  constructor(box, doc, properties, required = [], { skip = new Set(), models = [] } = {}) {
    this.box = box;
    this.fields = new Map(); // name -> {spec, input, kind, required}
    for (const [name, raw] of Object.entries(properties)) {
      if (skip.has(name)) continue;
      this.add(name, fieldSpec(doc, raw), required.includes(name), models);
    }
  }

  add(name, spec, required, models) {
    const id = `field-${name}`;
    const hint = spec.description ? el("small", { className: "hint", textContent: spec.description }) : null;
    const label = el("label", { htmlFor: id, textContent: required ? `${name} *` : name, title: spec.description || "" });
    const cell = el("div", { className: "field" });
    let input;
    let kind = spec.type;
    if (spec.type === "boolean") {
      input = el("input", { type: "checkbox", id, checked: Boolean(spec.default) });
      label.textContent = "";
      label.className = "check";
      label.append(input, name);
      cell.classList.add("wide");
      cell.append(label);
      if (hint) cell.append(hint);
      return this.register(name, { spec, input, kind, required, cell });
    }
    if (name === "model" && models.length) {
      kind = "string";
      input = el("select", { id });
      input.append(new Option("(default)", ""));
      for (const key of models) input.append(new Option(key.split("/").pop(), key.split("/").pop()));
    } else if (spec.enum) {
      kind = "enum";
      input = el("select", { id });
      if (spec.nullable || spec.default === undefined) input.append(new Option("(default)", ""));
      for (const choice of spec.enum) input.append(new Option(String(choice), String(choice)));
      if (spec.default !== undefined && spec.default !== null) input.value = String(spec.default);
    } else if (spec.type === "integer" || spec.type === "number") {
      input = el("input", { id, type: "number", step: spec.type === "integer" ? "1" : "any" });
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      if (spec.default !== undefined && spec.default !== null) input.value = spec.default;
      else input.placeholder = name === "seed" ? "random" : "default";
    } else if (spec.type === "string") {
      input = el("input", { id, type: "text", placeholder: "default" });
      if (spec.default) input.value = spec.default;
    } else if (spec.type === "array" && spec.items?.enum) {
      // A set of choices: one checkbox each, inside a group the label names.
      kind = "choices";
      input = el("div", { id, className: "choices", tabIndex: -1 });
      input.setAttribute("role", "group");
      const chosen = new Set(spec.default || []);
      for (const choice of spec.items.enum) {
        const box = el("input", { type: "checkbox", value: String(choice), checked: chosen.has(choice) });
        const option = el("label", { className: "check" });
        option.append(box, String(choice));
        input.append(option);
      }
      cell.classList.add("wide");
    } else if (spec.type === "array") {
      kind = "list";
      input = el("input", { id, type: "text", placeholder: "comma-separated" });
      if (Array.isArray(spec.default)) input.value = spec.default.join(", ");
    } else {
      // Objects and mixed values: JSON (or plain text where a string is allowed too).
      kind = spec.type === "mixed" ? "mixed" : "json";
      input = el("textarea", { id, rows: 3, spellcheck: false, placeholder: kind === "json" ? "JSON" : "text or JSON" });
      if (spec.default !== undefined && spec.default !== null) input.value = JSON.stringify(spec.default);
      cell.classList.add("wide");
    }
    cell.append(label, input);
    if (hint) cell.append(hint);
    this.register(name, { spec, input, kind, required, cell });
  }

  register(name, field) {
    field.input.dataset.field = name;
    field.input.dataset.kind = field.kind;
    this.fields.set(name, field);
    this.box.append(field.cell);
    const recheck = () => this.checkField(name);
    field.input.addEventListener("change", recheck);
    field.input.addEventListener("input", recheck);
  }

  input(name) {
    return this.fields.get(name)?.input || null;
  }

  // The value to send, undefined for "leave it to the server"; throws Error(message).
  value(name) {
    const { spec, input, kind, required } = this.fields.get(name);
    if (kind === "boolean") return input.checked;
    if (kind === "choices") return [...input.querySelectorAll("input:checked")].map((b) => b.value);
    const text = input.value;
    if (text.trim() === "") {
      if (required) throw new Error("is required");
      return undefined;
    }
    if (kind === "integer" || kind === "number") {
      const problem = checkNumber(spec, text);
      if (problem) throw new Error(problem);
      return Number(text);
    }
    if (kind === "enum") {
      const match = spec.enum.find((choice) => String(choice) === text);
      return match === undefined ? text : match;
    }
    if (kind === "list") {
      const items = text.split(",").map((s) => s.trim()).filter(Boolean);
      const itemSpec = spec.items || {};
      const numeric = itemSpec.type === "integer" || itemSpec.type === "number";
      for (const item of items) {
        const problem = numeric ? checkNumber(itemSpec, item) : checkString(itemSpec, item);
        if (problem) throw new Error(`item ${JSON.stringify(item)} ${problem}`);
      }
      if (spec.minItems !== undefined && items.length < spec.minItems) throw new Error(`needs at least ${spec.minItems} items`);
      if (spec.maxItems !== undefined && items.length > spec.maxItems) throw new Error(`takes at most ${spec.maxItems} items`);
      return numeric ? items.map(Number) : items;
    }
    if (kind === "json" || kind === "mixed") {
      const trimmed = text.trim();
      if (kind === "mixed" && !/^[[{]/.test(trimmed)) return text;
      try {
        return JSON.parse(trimmed);
      } catch (err) {
        throw new Error(`is not valid JSON (${err.message})`);
      }
    }
    const problem = checkString(spec, text);
    if (problem) throw new Error(problem);
    return text;
  }

  checkField(name) {
    const field = this.fields.get(name);
    try {
      this.value(name);
      markField(field.input, "");
      return true;
    } catch (err) {
      markField(field.input, `${name} ${err.message}`);
      return false;
    }
  }

  // Every field's value, or null when one is refused (each refusal shown on its field).
  values() {
    const body = {};
    let ok = true;
    for (const name of this.fields.keys()) {
      if (!this.checkField(name)) {
        ok = false;
        continue;
      }
      const value = this.value(name);
      if (value !== undefined) body[name] = value;
    }
    return ok ? body : null;
  }

  clearErrors() {
    for (const { input } of this.fields.values()) markField(input, "");
  }
}

// Shows a 422's FastAPI-style details ([{loc, msg}]) on the inputs they name; `lookup(loc)`
// gives the input for a location. Returns the messages no input took.
export function showServerErrors(detail, lookup) {
  const rest = [];
  const items = Array.isArray(detail) ? detail : [detail];
  for (const item of items) {
    const loc = Array.isArray(item?.loc) ? item.loc : [];
    const input = loc.length ? lookup(loc) : null;
    const message = item?.msg || (typeof item === "string" ? item : JSON.stringify(item));
    if (input) markField(input, `${loc.slice(1).join(".")}: ${message}`);
    else rest.push(loc.length ? `${loc.join(".")}: ${message}` : message);
  }
  return rest;
}
