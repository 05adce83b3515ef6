"""Offline adapter training: data loading, PEFT methods on transformers.Trainer, evaluation
with the base model beside, reports, method comparison and upload to a server.

Entry point: `trainer.cli.main(argv)` (train / eval / compare / push). Never imports `server`.
"""
