"""afqmc-dist: distributed fine-tuning of Chinese BERT-family models on sentence-pair tasks (AFQMC, LCQMC, BQ...)."""

__version__ = "0.1.0"
