"""`python -m prefill_worker --config C --worker-id prefill-0 --router EP`."""
import sys


def build(args, config, group, runner, control):
    from cluster.runtime.worker_main import data_plane_build
    from prefill_worker.scheduler import PrefillScheduler
    return data_plane_build(PrefillScheduler, args, config, group, runner, control)


def main(argv=None) -> int:
    from cluster.runtime.worker_main import run_worker
    return run_worker("prefill", argv, build)


if __name__ == "__main__":
    sys.exit(main())
