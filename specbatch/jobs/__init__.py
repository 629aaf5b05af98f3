"""The batch-job system around the engine: spec, data, preflight, workers, driver, report, audit."""
