"""The router: OpenAI-compatible HTTP front end of a pdcluster.

- `app.py`          FastAPI routes (completions, chat, models, health, metrics, internal)
- `openai_request.py` request bodies -> validated `ParsedRequest` (400s are raised here)
- `openai_response.py` response bodies, SSE chunks, logprobs formatting
- `service.py`      admission and streaming: model, tokenize, dispatch; events -> text deltas
- `prepare.py`      tokenize and validate: prompt size, token ids, one SamplingParams
- `request_state.py` per-request state and the events handed to the HTTP side
- `mailbox.py`      a request's events from the dispatcher's thread to its coroutine
- `completion.py`   one request's text: incremental detokenizing, stop-string trimming
- `dispatcher.py`   the control loop: registration, heartbeats, dispatch, tokens
- `request_table.py` the requests in flight: attempts start, end, abort
- `failover.py`     workers gone or back: requests moved, parked, resumed or failed
- `worker_directory.py` live workers, their gauges and the dispatch policies
- `metrics.py`      Prometheus text for router histograms and worker gauges
- `errors.py`       `APIError` and the `{"error": {...}}` body
- `request_body.py`, `tokenize_routes.py`, `tool_calls.py`, `tracing.py`, `request_trace.py`,
  `otlp_export.py`  body limits, /tokenize, tools, request phases and their export
- `control_answers.py` /health, /metrics, /debug, /admin, /internal: answers from the dispatcher's state
- `frontends.py`    `[router] api_servers` > 1: the front-end processes, started and restarted
- `frontend.py`     one front end (`python -m cluster.router.frontend`), started by frontends.py
- `dispatcher_link.py` a front end's stand-in for the Dispatcher (messages to the dispatcher)
- `frontend_hub.py` the dispatcher's side of its front ends
- `__main__.py`     `python -m cluster.router --config C --control ENDPOINT`
"""
