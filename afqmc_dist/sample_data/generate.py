"""Regenerate the sample dataset: `python -m afqmc_dist.sample_data.generate`.

Hand-written question paraphrases (written for this project, in AFQMC's style and format), grouped by intent.
The test split carries ids (as AFQMC's) and labels. A pair of two phrasings of one intent is label "1",
a pair across intents label "0", about 31% "1" as in AFQMC.
"""

import json
import random
from pathlib import Path

INTENTS = [
    ["花呗怎么还款", "花呗在哪里还钱", "怎样还花呗的钱", "花呗的账单怎么还", "我要还花呗怎么操作"],
    ["花呗可以提前还款吗", "花呗能不能提前还", "提前还清花呗可以吗", "花呗没到期可以先还吗"],
    ["借呗额度怎么提升", "怎样提高借呗的额度", "借呗额度太低怎么办", "如何增加借呗额度"],
    ["借呗怎么开通", "为什么我没有借呗", "如何开通蚂蚁借呗", "借呗在哪里开通"],
    ["花呗逾期会怎么样", "花呗逾期了有什么影响", "花呗晚还几天会影响征信吗", "花呗超过还款日没还怎么办"],
    ["怎么关闭花呗", "花呗可以注销吗", "我不想用花呗了怎么关掉", "如何取消花呗"],
    ["花呗可以分期吗", "花呗账单怎么分期还", "怎么把花呗账单分成几期", "花呗能分12期还吗"],
    ["借呗每个月几号还款", "借呗的还款日是哪天", "借呗什么时候扣款", "借呗还款时间怎么看"],
    ["花呗临时额度怎么用", "花呗的临时额度是什么", "临时额度到期了要还吗", "花呗临时额度怎么申请"],
    ["花呗付款为什么失败", "用花呗支付不了怎么回事", "花呗不能付款了", "为什么花呗付不了款"],
    ["借呗利息怎么算", "借呗一万一个月多少利息", "借呗的日利率是多少", "借呗利息高不高"],
    ["商家怎么开通花呗收款", "如何用花呗收钱", "我的店铺能收花呗吗", "花呗收款要手续费吗"],
]
SIZES = {"train": 240, "dev": 61, "test": 60}
POSITIVE_SHARE = 0.31


def make_pair(rng: random.Random) -> dict:
    if rng.random() < POSITIVE_SHARE:
        s1, s2 = rng.sample(rng.choice(INTENTS), 2)
        return {"sentence1": s1, "sentence2": s2, "label": "1"}
    a, b = rng.sample(INTENTS, 2)
    return {"sentence1": rng.choice(a), "sentence2": rng.choice(b), "label": "0"}


def main() -> None:
    rng = random.Random(2024)
    out = Path(__file__).parent
    for split, size in SIZES.items():
        rows = [make_pair(rng) for _ in range(size)]
        if split == "test":  # ids as in AFQMC's test file, labels kept so that --do_test can score it
            rows = [{"id": i, **r} for i, r in enumerate(rows)]
        with open(out / f"{split}.json", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    main()
