"""The worker runtime every role is built from.

- `schedule_batch.py`  Req and ScheduleBatch (forward_iter: the launch identity of a batch)
- `base_scheduler.py`  Scheduler: run_batch, the normal and overlap loops, stats reporting
- `worker_scheduler.py` WorkerScheduler: intake (generate / abort), pages and slots, token
                       output, failing a request, heartbeat gauges
- `forward_executor.py` forwards inline or on the forward thread (overlap)
- `prefill_manager.py`, `decode_manager.py`, `cache_manager.py`  one queue or pool each
- `deadline_queue.py`  entries that expire (prefill bootstrap / inflight, decode transfer)
- `kv_handoff.py`      KvHandoff: a prefill or decode worker's data plane, transfer hub,
                       transfer stats and peer checks, passed to its scheduler
- `batch_builder.py`   ScheduleBatch -> ForwardInput (future tokens, per-token seeds)
- `output_processor.py` the commit loop shared by prefill and the output processor
- `stats.py`           `Prefill batch [N]` / `Decode batch [N]` lines, per-role stats objects
- `worker_main.py`     process entry: `python -m <role package> --config C --worker-id ID --router EP`
"""
