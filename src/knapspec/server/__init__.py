"""``knapspec serve``: an OpenAI-compatible HTTP server, and ``knapspec bench serve``, its load test.

* :mod:`.protocol`: OpenAI's request and response shapes, checks, errors;
* :mod:`.text`: text released as it becomes final, cut at stop strings;
* :mod:`.worker`: the FIFO queue and the one engine thread;
* :mod:`.metrics`: Prometheus metrics under vLLM's names;
* :mod:`.app`: the Starlette routes and the uvicorn runner;
* :mod:`.bench`: concurrent streaming clients, measured as ``vllm bench serve`` measures.

No decoding logic here: a request becomes the API call ``knapspec generate`` makes
(``LLM.encode`` / ``LLM.encode_chat``, then ``LLM.stream_ids``).
"""

from .app import create_app

__all__ = ["create_app"]
