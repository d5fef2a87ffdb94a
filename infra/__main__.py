"""``python -m infra fetch|up|down|status [--minio]``: local services without the sluice CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from infra import local
from infra.kafka.broker import ensure_kafka
from infra.minio.server import ensure_minio
from infra.process import InfraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra")
    parser.add_argument("command", choices=["fetch", "up", "down", "status"])
    parser.add_argument("--minio", action="store_true", help="MinIO too")
    parser.add_argument("--kafka-port", type=int, default=0)
    parser.add_argument("--minio-port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "fetch":
            print(ensure_kafka())
            if args.minio:
                print(ensure_minio())
        elif args.command == "up":
            st = local.up(minio=args.minio, kafka_port=args.kafka_port, minio_port=args.minio_port)
            for handle in (st.kafka, st.minio):
                if handle is not None:
                    print(f"{handle.name} {handle.address}")
        elif args.command == "down":
            for line in local.down():
                print(f"stopped {line}")
        else:
            st = local.status()
            print(f"kafka {st.kafka.address if st.kafka else 'stopped'}")
            print(f"minio {st.minio.address if st.minio else 'stopped'}")
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
