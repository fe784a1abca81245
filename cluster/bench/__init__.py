"""`pdcluster bench`: an OpenAI-API load generator and its reports.

- `cli`: the arguments and `cmd_bench`, which picks one of the three loads below.
- `client`: one streamed request timed token by token (`one_request`, `stream_timed`);
  benchmarks under `benchmarks/` reuse it so their figures are measured the same way.
- closed loop (`cli.run_closed_loop`): `--concurrency` requests in flight.
- `goodput`: open-loop Poisson arrivals at swept rates, SLO attainment and goodput.
- `multiturn`: conversations that re-send their history every turn.
- `report`: the summary under `vllm bench serve`'s names, `--json`, `--plot`.

Imports run one way: `cli` -> `goodput`, `multiturn` -> `client`, `report`.
"""
