// The layout canvas for Ideogram 4 JSON captions: each element of
// compositional_deconstruction.elements is a box over a stage with the image's aspect ratio.
//
// Coordinates are the caption's own: 0..1000 on each axis (x across the width, y down the
// height, whatever the aspect ratio), and a bbox is [y_min, x_min, y_max, x_max] of integers,
// the order mflux's verifier checks. Boxes are plain DOM (percent positions), so they scale
// with the stage and stay reachable by keyboard and by tests.

const SCALE = 1000;
const STEP = 10; // arrow keys: 1 % of a side; Shift+arrow moves by 1
const MIN_DRAW = 5; // a press that moves less than this draws nothing (a click)
const MAX_COLORS = 5; // the verifier's limit for an element's color_palette
const HANDLES = ["nw", "n", "ne", "e", "se", "s", "sw", "w"];

// Key orders of mflux's Ideogram4CaptionVerifier; keys it does not know are kept after them,
// so its warning about them stays visible.
const TOP_ORDER = ["high_level_description", "style_description", "compositional_deconstruction"];
const COMPOSITION_ORDER = ["background", "elements"];
const ELEMENT_ORDER = {
  text: ["type", "bbox", "text", "desc", "color_palette"],
  obj: ["type", "bbox", "desc", "color_palette"],
};
const STYLE_ORDER = {
  photo: ["aesthetics", "lighting", "photo", "medium", "color_palette"],
  art: ["aesthetics", "lighting", "medium", "art_style", "color_palette"],
};

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const clamp = (v, lo = 0, hi = SCALE) => Math.min(Math.max(v, lo), hi);

function ordered(object, order) {
  if (!isObject(object)) return object;
  const out = {};
  for (const key of order) if (key in object) out[key] = object[key];
  for (const [key, value] of Object.entries(object)) if (!(key in out)) out[key] = value;
  return out;
}

// The caption with every level's keys in the verifier's order.
export function orderCaption(caption) {
  const top = ordered(caption, TOP_ORDER);
  if (isObject(top.style_description)) {
    const style = top.style_description;
    top.style_description = ordered(style, "photo" in style ? STYLE_ORDER.photo : STYLE_ORDER.art);
  }
  if (isObject(top.compositional_deconstruction)) {
    const composition = ordered(top.compositional_deconstruction, COMPOSITION_ORDER);
    if (Array.isArray(composition.elements)) {
      composition.elements = composition.elements.map((e) =>
        isObject(e) ? ordered(e, ELEMENT_ORDER[e.type] || ELEMENT_ORDER.obj) : e);
    }
    top.compositional_deconstruction = composition;
  }
  return top;
}

// A drawable box {top, left, bottom, right} from a bbox, or null when it is not one.
function boxOf(bbox) {
  if (!Array.isArray(bbox) || bbox.length !== 4 || !bbox.every((v) => typeof v === "number" && Number.isFinite(v))) return null;
  const [y0, x0, y1, x1] = bbox.map((v) => clamp(v));
  return { top: Math.min(y0, y1), left: Math.min(x0, x1), bottom: Math.max(y0, y1), right: Math.max(x0, x1) };
}

const bboxOf = (b) => [b.top, b.left, b.bottom, b.right].map(Math.round);

// Warnings name their element as "elements[3]..." (mflux's wording): index -> messages.
export function elementWarnings(warnings) {
  const found = new Map();
  for (const message of warnings) {
    const match = /^elements\[(\d+)\]/.exec(message);
    if (!match) continue;
    const index = Number(match[1]);
    if (!found.has(index)) found.set(index, []);
    found.get(index).push(message);
  }
  return found;
}

const $ = (id) => document.getElementById(id);

export class LayoutCanvas {
  // onChange(caption): the user changed the layout; the page writes the caption out.
  constructor({ onChange }) {
    this.onChange = onChange;
    this.caption = null; // the parsed caption (null: the prompt is not a JSON object)
    this.selected = -1;
    this.boxes = []; // DOM boxes, by element index (updated in place: focus survives)
    this.warnings = new Map();
    this.drag = null;
    this.stage = $("stage");
    this.layer = $("boxes");
    this.stage.addEventListener("pointerdown", (e) => this.pointerDown(e));
    this.stage.addEventListener("pointermove", (e) => this.pointerMove(e));
    this.stage.addEventListener("pointerup", (e) => this.pointerUp(e));
    this.stage.addEventListener("pointercancel", (e) => this.pointerUp(e));
    $("add-text").addEventListener("click", () => this.addCentered("text"));
    $("add-obj").addEventListener("click", () => this.addCentered("obj"));
    $("show-boxes").addEventListener("change", () => this.layer.classList.toggle("hidden", !$("show-boxes").checked));
    this.bindEditor();
    this.render();
  }

  get elements() {
    const list = this.caption?.compositional_deconstruction?.elements;
    return Array.isArray(list) ? list : [];
  }

  // -- from and to the prompt ---------------------------------------------------------------
  setCaption(caption) {
    this.caption = isObject(caption) ? caption : null;
    if (this.selected >= this.elements.length) this.selected = -1;
    this.render();
  }

  // A caption to draw into, made from a plain prompt when there is none yet.
  ensureCaption(promptText) {
    if (!this.caption) this.caption = { high_level_description: (promptText || "").trim() };
    const c = this.caption;
    if (!isObject(c.compositional_deconstruction)) c.compositional_deconstruction = { background: "" };
    if (!Array.isArray(c.compositional_deconstruction.elements)) c.compositional_deconstruction.elements = [];
    return c.compositional_deconstruction.elements;
  }

  changed() {
    this.render();
    this.onChange(orderCaption(this.caption));
  }

  setAspect(width, height) {
    const w = width > 0 ? width : 1024;
    const h = height > 0 ? height : 1024;
    this.stage.style.aspectRatio = `${w} / ${h}`;
    // Tall images stay on screen: the height is capped, the width follows.
    this.stage.style.width = `min(100%, ${(70 * w / h).toFixed(3)}vh)`;
    this.stage.dataset.aspect = `${w}x${h}`;
  }

  setWarnings(warnings) {
    this.warnings = elementWarnings(warnings);
    this.render();
  }

  // The image under the boxes: a live preview while generating, then the result.
  setImage(url, kind) {
    const image = $("stage-image");
    image.hidden = !url;
    if (url) image.src = url;
    else image.removeAttribute("src");
    this.stage.dataset.image = url ? kind : "";
  }

  // -- pointer: draw, move, resize --------------------------------------------------------
  point(event) {
    const rect = this.stage.getBoundingClientRect();
    return {
      x: clamp(Math.round(((event.clientX - rect.left) / rect.width) * SCALE)),
      y: clamp(Math.round(((event.clientY - rect.top) / rect.height) * SCALE)),
    };
  }

  pointerDown(event) {
    if (event.button !== 0) return;
    const start = this.point(event);
    const handle = event.target.closest(".handle");
    const boxEl = event.target.closest(".box");
    if (boxEl) {
      const index = Number(boxEl.dataset.index);
      const box = boxOf(this.elements[index].bbox) || { top: start.y, left: start.x, bottom: start.y, right: start.x };
      this.select(index, true);
      this.drag = { mode: handle ? handle.dataset.handle : "move", index, start, box, last: start };
    } else {
      this.drag = { mode: "draw", index: -1, start, last: start };
    }
    event.preventDefault(); // no text selection or native image drag while dragging
    this.stage.setPointerCapture(event.pointerId);
  }

  pointerMove(event) {
    const drag = this.drag;
    if (!drag) return;
    const p = this.point(event);
    if (drag.last && p.x === drag.last.x && p.y === drag.last.y) return; // a click writes nothing
    drag.last = p;
    if (drag.mode === "draw") {
      if (drag.index < 0) {
        if (Math.max(Math.abs(p.x - drag.start.x), Math.abs(p.y - drag.start.y)) < MIN_DRAW) return;
        const type = document.querySelector('input[name="draw-type"]:checked')?.value || "text";
        const elements = this.ensureCaption($("prompt").value);
        elements.push(newElement(type, [drag.start.y, drag.start.x, drag.start.y, drag.start.x]));
        drag.index = elements.length - 1;
        this.selected = drag.index;
      }
      const box = {
        top: Math.min(drag.start.y, p.y), bottom: Math.max(drag.start.y, p.y),
        left: Math.min(drag.start.x, p.x), right: Math.max(drag.start.x, p.x),
      };
      this.elements[drag.index].bbox = bboxOf(box);
    } else if (drag.mode === "move") {
      const b = drag.box;
      const dy = clamp(p.y - drag.start.y, -b.top, SCALE - b.bottom);
      const dx = clamp(p.x - drag.start.x, -b.left, SCALE - b.right);
      this.elements[drag.index].bbox = bboxOf({ top: b.top + dy, left: b.left + dx, bottom: b.bottom + dy, right: b.right + dx });
    } else {
      const b = { ...drag.box };
      if (drag.mode.includes("n")) b.top = p.y;
      if (drag.mode.includes("s")) b.bottom = p.y;
      if (drag.mode.includes("w")) b.left = p.x;
      if (drag.mode.includes("e")) b.right = p.x;
      // Dragged past the opposite edge: the box flips rather than turning inside out.
      this.elements[drag.index].bbox = bboxOf({
        top: Math.min(b.top, b.bottom), bottom: Math.max(b.top, b.bottom),
        left: Math.min(b.left, b.right), right: Math.max(b.left, b.right),
      });
    }
    this.changed();
  }

  pointerUp(event) {
    if (!this.drag) return;
    this.pointerMove(event); // the release point counts, even without a move before it
    const { index, mode } = this.drag;
    this.drag = null;
    if (mode === "draw" && index < 0) this.select(-1);
    else if (index >= 0) this.boxes[index]?.focus();
  }

  // -- keyboard --------------------------------------------------------------------------
  keyDown(event, index) {
    const b = boxOf(this.elements[index]?.bbox);
    const arrows = { ArrowUp: [0, -1], ArrowDown: [0, 1], ArrowLeft: [-1, 0], ArrowRight: [1, 0] };
    if (event.key in arrows && b) {
      const [ax, ay] = arrows[event.key];
      const step = event.shiftKey ? 1 : STEP;
      let next;
      if (event.altKey) {
        // Alt+arrows resize: the bottom-right corner follows the arrow.
        next = { ...b, right: clamp(b.right + ax * step, b.left), bottom: clamp(b.bottom + ay * step, b.top) };
      } else {
        const dx = clamp(ax * step, -b.left, SCALE - b.right);
        const dy = clamp(ay * step, -b.top, SCALE - b.bottom);
        next = { top: b.top + dy, bottom: b.bottom + dy, left: b.left + dx, right: b.right + dx };
      }
      this.elements[index].bbox = bboxOf(next);
      this.changed();
    } else if (event.key === "Delete" || event.key === "Backspace") {
      this.remove(index);
    } else if (event.key === "Enter" || event.key === "F2") {
      ($("el-text").closest("label").hidden ? $("el-desc") : $("el-text")).focus();
    } else if (event.key === "Escape") {
      this.select(-1);
      this.boxes[index]?.blur();
    } else {
      return;
    }
    event.preventDefault();
  }

  // -- elements ----------------------------------------------------------------------------
  addCentered(type) {
    const elements = this.ensureCaption($("prompt").value);
    const shift = (elements.length % 5) * 40; // each new one a little lower, not on top
    elements.push(newElement(type, [350 + shift, 250, 550 + shift, 750]));
    this.selected = elements.length - 1;
    this.changed();
    this.boxes[this.selected].focus();
  }

  remove(index) {
    this.elements.splice(index, 1);
    // Until the next check answers, the later elements' warnings follow them down one place.
    this.warnings = new Map([...this.warnings].filter(([i]) => i !== index).map(([i, w]) => [i > index ? i - 1 : i, w]));
    this.selected = this.elements.length ? Math.min(index, this.elements.length - 1) : -1;
    this.changed();
    if (this.selected >= 0) this.boxes[this.selected].focus();
    else this.stage.focus();
  }

  select(index, quiet = false) {
    if (this.selected === index) return;
    this.selected = index;
    this.render();
    if (!quiet && index >= 0) this.boxes[index].focus();
  }

  // -- drawing ---------------------------------------------------------------------------
  render() {
    const elements = this.elements;
    while (this.boxes.length > elements.length) this.boxes.pop().remove();
    while (this.boxes.length < elements.length) {
      const index = this.boxes.length;
      const box = document.createElement("div");
      box.className = "box";
      box.tabIndex = 0;
      box.dataset.index = String(index);
      box.setAttribute("role", "button");
      box.append(Object.assign(document.createElement("span"), { className: "label" }));
      for (const h of HANDLES) {
        const handle = Object.assign(document.createElement("span"), { className: `handle ${h}` });
        handle.dataset.handle = h;
        box.append(handle);
      }
      box.addEventListener("focus", () => this.select(index, true));
      box.addEventListener("keydown", (e) => this.keyDown(e, index));
      this.layer.append(box);
      this.boxes.push(box);
    }
    elements.forEach((element, index) => {
      const box = this.boxes[index];
      const b = boxOf(element?.bbox) || { top: 0, left: 0, bottom: SCALE, right: SCALE };
      box.style.top = `${b.top / 10}%`;
      box.style.left = `${b.left / 10}%`;
      box.style.height = `${(b.bottom - b.top) / 10}%`;
      box.style.width = `${(b.right - b.left) / 10}%`;
      const type = element?.type === "text" ? "text" : "obj";
      const warnings = this.warnings.get(index) || [];
      box.className = `box ${type}${index === this.selected ? " selected" : ""}${warnings.length ? " warn" : ""}${boxOf(element?.bbox) ? "" : " nobbox"}`;
      box.dataset.warnings = String(warnings.length);
      box.title = warnings.join("\n");
      const what = type === "text" ? JSON.stringify(element.text ?? "") : element?.desc || "object";
      box.firstChild.textContent = `${index + 1} ${what}${warnings.length ? " ⚠" : ""}`;
      box.setAttribute("aria-label", `element ${index + 1}, ${type}: ${what}; arrows move, Delete removes${warnings.length ? `; ${warnings.join("; ")}` : ""}`);
      const color = Array.isArray(element?.color_palette) && /^#[0-9A-F]{6}$/i.test(element.color_palette[0]) ? element.color_palette[0] : "";
      box.style.setProperty("--swatch", color || "transparent");
    });
    $("layout-status").textContent = this.caption
      ? `${elements.length} element${elements.length === 1 ? "" : "s"} · drag on the canvas to draw one`
      : "The prompt is plain text: drag on the canvas (or add an element) to turn it into a JSON caption.";
    this.renderEditor();
  }

  // -- the selected element's editor ---------------------------------------------------------
  bindEditor() {
    const edit = (apply) => () => {
      const element = this.elements[this.selected];
      if (!element) return;
      apply(element);
      this.changed();
    };
    $("el-type").addEventListener("change", edit((e) => {
      e.type = $("el-type").value;
      if (e.type === "text" && typeof e.text !== "string") e.text = "";
      if (e.type === "obj") delete e.text;
    }));
    $("el-text").addEventListener("input", edit((e) => { e.text = $("el-text").value; }));
    $("el-desc").addEventListener("input", edit((e) => { e.desc = $("el-desc").value; }));
    $("el-add-color").addEventListener("click", edit((e) => {
      if (!Array.isArray(e.color_palette)) e.color_palette = [];
      if (e.color_palette.length < MAX_COLORS) e.color_palette.push("#000000");
    }));
    $("el-delete").addEventListener("click", () => this.selected >= 0 && this.remove(this.selected));
    $("el-colors").addEventListener("input", edit((e) => {
      // <input type=color> gives lowercase; the verifier wants uppercase #RRGGBB.
      e.color_palette = [...$("el-colors").querySelectorAll("input[type=color]")].map((i) => i.value.toUpperCase());
    }));
    $("el-colors").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-color]");
      if (!button) return;
      edit((e) => {
        e.color_palette.splice(Number(button.dataset.color), 1);
        if (!e.color_palette.length) delete e.color_palette;
      })();
    });
  }

  renderEditor() {
    const element = this.elements[this.selected];
    const editor = $("element-editor");
    editor.hidden = !element;
    if (!element) return;
    $("el-title").textContent = `Element ${this.selected + 1}`;
    const type = element.type === "text" ? "text" : "obj";
    if ($("el-type").value !== type) $("el-type").value = type;
    $("el-text").closest("label").hidden = type !== "text";
    // Only set what differs: rewriting the field being typed in would move its caret.
    if ($("el-text").value !== (element.text ?? "")) $("el-text").value = element.text ?? "";
    if ($("el-desc").value !== (element.desc ?? "")) $("el-desc").value = element.desc ?? "";
    const palette = Array.isArray(element.color_palette) ? element.color_palette : [];
    const colors = $("el-colors");
    const current = [...colors.querySelectorAll("input[type=color]")].map((i) => i.value.toUpperCase());
    if (current.join() !== palette.map((c) => String(c).toUpperCase()).join()) {
      colors.replaceChildren(...palette.map((color, i) => {
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        const input = Object.assign(document.createElement("input"), { type: "color", title: String(color) });
        input.setAttribute("aria-label", `color ${i + 1}`);
        if (/^#[0-9A-Fa-f]{6}$/.test(color)) input.value = color.toLowerCase();
        const drop = Object.assign(document.createElement("button"), { type: "button", className: "small", textContent: "×", title: "remove this color" });
        drop.dataset.color = String(i);
        swatch.append(input, drop);
        return swatch;
      }));
    }
    $("el-add-color").disabled = palette.length >= MAX_COLORS;
    const warnings = this.warnings.get(this.selected) || [];
    $("el-warnings").replaceChildren(...warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
  }
}

function newElement(type, bbox) {
  return type === "text" ? { type, bbox, text: "TEXT", desc: "" } : { type: "obj", bbox, desc: "" };
}
