"""A vLLM OpenAI-API simulator: vLLM's routes, error bodies and metric names, with
deterministic text and timed tokens. A package of its own: the gateway's core never
imports it (only the ``vllm-gateway simulate`` command runs it); the demo, the tests
and the load tests run it as a model server, like vLLM."""
