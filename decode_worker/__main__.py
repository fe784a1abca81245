"""`python -m decode_worker --config C --worker-id decode-0 --router EP`."""
import sys


def build(args, config, group, runner, control):
    from cluster.runtime.worker_main import data_plane_build
    from decode_worker.scheduler import DecodeScheduler
    return data_plane_build(DecodeScheduler, args, config, group, runner, control, tpot=config.slo.tpot)


def main(argv=None) -> int:
    from cluster.runtime.worker_main import run_worker
    return run_worker("decode", argv, build)


if __name__ == "__main__":
    sys.exit(main())
