"""A local MinIO server (S3-compatible object storage) built from its Go module."""

from infra.minio.server import (
    MINIO_MODULE,
    MINIO_VERSION,
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    MinioConfig,
    ensure_minio,
    start_minio,
    stop_minio,
)

__all__ = [
    "MINIO_MODULE",
    "MINIO_VERSION",
    "TEST_ACCESS_KEY",
    "TEST_SECRET_KEY",
    "MinioConfig",
    "ensure_minio",
    "start_minio",
    "stop_minio",
]
