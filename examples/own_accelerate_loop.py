"""A plain accelerate fine-tuning loop made exact by bert_accum's kit: every (B, N, W) of one B*N*W gives one gradient.

    python examples/own_accelerate_loop.py --check    # tiny BERT built in code, dropout 0.1: (B=8,N=1) vs (B=2,N=4)
    accelerate launch examples/own_accelerate_loop.py --task_name rte --gradient_accumulation_steps 4 --output_dir out
"""
import argparse
import contextlib
import random
import sys

import torch
from accelerate import Accelerator
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertTokenizer, get_scheduler

from bert_accum import WindowCollator, WindowSampler, install_invariant_dropout, window_loss_scales


def train_window(model, window, data, collator, dropout, accelerator) -> float:
    """Forward/backward this process's micro-batches of one window; returns its part of the window loss times W."""
    micro, total = collator.collate_window(data, window), 0.0
    for j, (batch, scale) in enumerate(zip(micro, window_loss_scales(micro, accelerator=accelerator))):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(model)  # all-reduce once
        with sync, dropout.batch(batch.pop("example_ids"), window.epoch):
            loss = model(**batch).loss * scale
            accelerator.backward(loss)
        total += float(loss.detach())
    return total


def check() -> int:
    """One window at (B=8, N=1) and at (B=2, N=4) on a tiny BERT; status 1 if the gradients differ beyond round-off."""
    words = "the a good bad movie plot was not very quite dull fun".split()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])})
    rng = random.Random(0)  # 40 examples of 4 to 32 tokens, so padding differs between micro-batches
    data = [{**tokenizer(" ".join(rng.choices(words, k=rng.randint(2, 30)))), "label": rng.randint(0, 1), "idx": i}
            for i in range(40)]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    grads = []
    for b, n in [(8, 1), (2, 4)]:
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        dropout = install_invariant_dropout(model, seed=0)
        model = accelerator.prepare(model).train()
        window = next(iter(WindowSampler(len(data), b, n)))  # the same 8 examples either way
        train_window(model, window, data, WindowCollator(tokenizer), dropout, accelerator)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    rel = float((grads[1] - grads[0]).norm() / grads[0].norm())
    print(f"relative L2 difference of the accumulated gradients, (B=8,N=1) vs (B=2,N=4): {rel:.3e}")
    return 0 if rel <= 1e-5 else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="the self-test above (no download)")
    for flag, default in [("task_name", "rte"), ("model_name_or_path", "bert-base-uncased"), ("output_dir", ""),
                          ("per_device_train_batch_size", 8), ("gradient_accumulation_steps", 4),
                          ("learning_rate", 2e-5), ("num_train_epochs", 3), ("seed", 42)]:
        p.add_argument(f"--{flag}", type=type(default), default=default)
    args = p.parse_args()
    if args.check:
        sys.exit(check())
    accelerator = Accelerator()  # gradient_accumulation_steps stays 1: the kit scales the loss (and refuses >1)
    raw = load_dataset("nyu-mll/glue", args.task_name, split="train")  # GLUE rows carry an example id, `idx`
    text = [c for c, f in raw.features.items() if getattr(f, "dtype", None) == "string"]
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=getattr(raw.features["label"], "num_classes", 1))  # STS-B: 1, regression
    train = raw.map(lambda b: tokenizer(*(b[c] for c in text), truncation=True, max_length=128), batched=True)
    dropout = install_invariant_dropout(model, seed=args.seed)  # before prepare: it edits the model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)  # not the scheduler: prepared, it steps W times a step
    sampler = WindowSampler(len(train), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                            num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                            seed=args.seed)  # windows of B*N*W examples; B, N, W only say who computes what
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0,
                              num_training_steps=args.num_train_epochs * len(sampler))  # sized in optimizer steps
    collator = WindowCollator(tokenizer)
    for epoch in range(args.num_train_epochs):
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        for window in sampler:
            losses.append(train_window(model, window, train, collator, dropout, accelerator))
            accelerator.clip_grad_norm_(model.parameters(), 1.0)  # on the accumulated gradient only
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        mean = accelerator.reduce(torch.tensor(losses, device=accelerator.device), "mean").mean()
        accelerator.print(f"epoch {epoch}: {len(losses)} optimizer steps, mean window loss {float(mean):.4f}")
    if args.output_dir:
        dropout.remove()  # stock dropout and attention again before saving
        accelerator.unwrap_model(model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process)
        tokenizer.save_pretrained(args.output_dir)
    accelerator.end_training()  # under several processes: destroy the process group before the interpreter exits


if __name__ == "__main__":
    main()
