"""Facts on a real anchor: SmolLM2-135M composed with augments that know invented people (task, augments, rows,
scoring, report, pipeline)."""
