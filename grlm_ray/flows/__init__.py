"""What runs stages: the pipeline that walks the stage graph for one config (``pipeline.py``) and the
compression comparison that runs it once per setting (``compare.py``). Above ``stages/`` and ``lib/``, below
the CLI, the jobs and the benchmarks."""
