"""`python -m prefill_worker --config C --worker-id prefill-0 --router EP`."""
import sys


def main(argv=None) -> int:
    from cluster.runtime.worker_main import run_data_plane_worker
    from prefill_worker.scheduler import PrefillScheduler
    return run_data_plane_worker("prefill", PrefillScheduler, argv)


if __name__ == "__main__":
    sys.exit(main())
