"""Fine-tune a Chinese BERT-family model on a sentence-pair task (AFQMC by default).

    python train.py --help
    accelerate launch --config_file accelerate_config.yaml train.py --model_checkpoint bert-base-chinese \
        --train_file data/afqmc_public/train.json --dev_file data/afqmc_public/dev.json \
        --test_file data/afqmc_public/test.json --output_dir outputs/afqmc --do_train --do_predict
"""

import sys

from afqmc_dist.errors import stop_while_starting

if __name__ == "__main__":
    stop_while_starting()  # before the seconds of imports below

from afqmc_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
