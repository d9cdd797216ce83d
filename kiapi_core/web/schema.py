"""pydantic → JSON Schema helpers shared by the host and plugins.

OpenAPI components are generated from pydantic models (the single source of truth); these
helpers make the generated schema say exactly what we mean (e.g. "optional, no default").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


class Schema(BaseModel):
    """Base of the host's request and response models.

    Each builds its validator and serializer when first used rather than when its module is
    imported: a start imports every model, a run uses a few, and building them all was ~20 ms
    of every start (docs/performance.md, cold start).
    """

    model_config = ConfigDict(defer_build=True)


def drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _drop_title(schema: dict[str, Any]) -> None:
    schema.pop("title", None)


def optional(description: str = "", **kwargs: Any) -> Any:
    """An optional field that defaults to None in Python but declares no default in the schema.

    An absent value means "the server decides" (a drawn seed, the default model), which a
    schema ``default: null`` would misstate.
    """
    return Field(None, description=description, json_schema_extra=drop_default, **kwargs)


untitled = _drop_title


def components_from(*models: type[BaseModel]) -> dict[str, Any]:
    """``components.schemas`` for these models and every model they reference."""
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF_TEMPLATE)
    return dict(top.get("$defs", {}))


def ref(model: type[BaseModel] | str) -> dict[str, str]:
    """``{"$ref": "#/components/schemas/<name>"}`` for a model (or a component's name)."""
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": REF_TEMPLATE.format(model=name)}
