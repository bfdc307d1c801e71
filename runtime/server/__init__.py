"""The HTTP server: the Starlette app, the OpenAI request schema, the generation queue, the request guard (host, key, sizes), response formats."""
