"""gradlens inside a training run: hooks for the frameworks users train with.

- `gradlens.integrations.trl`: a `GRPOTrainer` subclass (or mixin) that diagnoses the real
  batch every few steps, logs ``report.metrics()`` through the trainer and dumps the batch of a
  grad_norm spike as a batch file (docs/integrations.md);
- `gradlens.integrations.verl`: the module verl loads with
  ``actor_rollout_ref.model.external_lib``; it registers ``gradlens_<name>`` around every verl
  policy loss;
The files a hooked run writes (a metrics JSONL, batch files with a JSON sidecar) are described
in `gradlens.run_files`; ``gradlens trace`` reads them back.

The frameworks are optional: each module imports its framework only when it is used.
"""
