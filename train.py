"""Fine-tune a Chinese BERT-family model on a sentence-pair task (AFQMC by default).

    python train.py --help
    accelerate launch --config_file accelerate_config.yaml train.py --model_checkpoint bert-base-chinese \
        --train_file data/afqmc_public/train.json --dev_file data/afqmc_public/dev.json \
        --test_file data/afqmc_public/test.json --output_dir outputs/afqmc --do_train --do_predict

The same command as `afqmc-train` once the project is installed (pip install -e .): afqmc_dist/commands.py.
"""

import sys

from afqmc_dist.commands import train

if __name__ == "__main__":
    sys.exit(train())
