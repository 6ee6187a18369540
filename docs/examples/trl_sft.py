"""Train lora-ranks' per-module ranks, from its warm start, in TRL's ``SFTTrainer``.

    lora-ranks extract --base BASE --finetuned FINETUNED --config lora_rank_config.json --out warm_start
    python docs/examples/trl_sft.py --model BASE --warm-start warm_start --data train.jsonl --out trl-run

``--warm-start`` is the adapter folder ``lora-ranks extract`` writes (``lora-ranks train`` writes the same one, as
``warm_start_adapter/``): ``PeftModel.from_pretrained(..., is_trainable=True)`` loads it, ranks, alphas and weights,
so training begins from exactly the model ``lora-ranks train`` begins from. ``--lora-config`` instead gives the ranks
with PEFT's init (``lora_ranks.lora_config``). The records go through lora-ranks' tokenization (prompt tokens masked,
an EOS after the response) and padding, so a batch is the same tensors as in ``lora-ranks train``; a dataset in one of
TRL's own formats (prompt/completion, messages) works too: drop ``skip_prepare_dataset`` and the collator.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import lora_ranks
from lora_ranks.data import collate
from lora_ranks.finetune import prepare_examples


def build_trainer(model_dir: str, data: str, out: str, *, warm_start: str | None = None,
                  rank_config: str | None = None, max_steps: int = 100, batch_size: int = 4,
                  learning_rate: float = 2e-4, max_length: int = 256, lora_dropout: float = 0.0,
                  seed: int = 0) -> SFTTrainer:
    """An ``SFTTrainer`` over lora-ranks' LoRA: from the warm-start folder, or a rank config with PEFT's init."""
    if warm_start is None and rank_config is None:
        raise SystemExit("give --warm-start (lora-ranks' initial model), --lora-config (PEFT's init), or both")
    if warm_start is not None and rank_config is not None:  # the folder must carry exactly the config's ranks
        try:
            lora_ranks.check_warm_start(warm_start, rank_config)
        except lora_ranks.LoraRanksError as exc:
            raise SystemExit(f"error: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if warm_start is not None:
        model = PeftModel.from_pretrained(model, warm_start, is_trainable=True)
    else:
        peft_config = lora_ranks.lora_config(rank_config, model=model, lora_dropout=lora_dropout)
    examples, _, _ = prepare_examples(data, tokenizer, max_length=max_length, seed=seed)
    args = SFTConfig(output_dir=out, max_steps=max_steps, per_device_train_batch_size=batch_size,
                     learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=int(0.1 * max_steps),
                     weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                     bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # TRL's default: bf16
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                      peft_config=peft_config, data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the base model folder (or hub id)")
    parser.add_argument("--data", required=True, help="training records (.jsonl), lora-ranks' format")
    parser.add_argument("--out", required=True, help="where the trained adapter goes")
    parser.add_argument("--warm-start", help="the adapter folder of lora-ranks extract (lora-ranks' initial model)")
    parser.add_argument("--lora-config", help="lora_rank_config.json, for PEFT's init at lora-ranks' ranks")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    args = parser.parse_args(argv)
    trainer = build_trainer(args.model, args.data, args.out, warm_start=args.warm_start, rank_config=args.lora_config,
                            max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate)
    trainer.train()
    trainer.save_model(args.out)  # a PEFT adapter folder, its per-module ranks in adapter_config.json


if __name__ == "__main__":
    main()
