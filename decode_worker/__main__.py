"""`python -m decode_worker --config C --worker-id decode-0 --router EP`."""
import sys


def main(argv=None) -> int:
    from cluster.runtime.worker_main import run_data_plane_worker
    from decode_worker.scheduler import DecodeScheduler
    return run_data_plane_worker("decode", DecodeScheduler, argv)


if __name__ == "__main__":
    sys.exit(main())
