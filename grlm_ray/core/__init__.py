"""The platform every stage stands on: config, storage (artifacts, manifests), the Ray runtime, MLflow tracking, the stage registry and the pipeline that walks it."""
