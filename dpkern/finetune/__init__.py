"""`dpkern finetune`: private fine-tuning of a Hugging Face model from one command.

    from dpkern.finetune import FinetuneConfig, run
    summary = run(FinetuneConfig(epsilon=3.0))        # MiniLM on SST-2, the README's first command

See config.py for every setting, job.py for the order of work, report.py for the run folder.
"""
from dpkern.finetune.config import FinetuneConfig, FinetuneError
from dpkern.finetune.job import run

__all__ = ["FinetuneConfig", "FinetuneError", "run"]
