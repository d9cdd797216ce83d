"""``POST /v1/images/generations``: OpenAI's Images API, served by the host for every plugin.

The host parses and checks the OpenAI-shaped request, picks the plugin by the requested model,
runs one job per image through the shared job queue, and answers in OpenAI's shapes (errors
included). A plugin takes part by registering an :class:`ImageGenerator` through the
``register_image_generators`` hook; it never sees HTTP.
"""

from kiapi_core.images.generator import ImageGenerator, ImageParamError, ImageRequest

__all__ = ["ImageGenerator", "ImageParamError", "ImageRequest"]
