"""HTTP plumbing with no domain in it: body parsing, errors, middleware, CORS, content
negotiation, OpenAPI merging and schema helpers, and the server's connection limits."""
