"""``pysafe train STAGE``: pretraining or one safety fine-tune of a lab model."""

from __future__ import annotations

import shlex

import click

from pysafe.cli.options import check_device, debug_option, device_option, handle_errors
from pysafe.lab.objectives import OBJECTIVES


@click.command("train")
@click.argument("stage", type=click.Choice(OBJECTIVES))
@click.option("--preset", default="cpu", show_default=True,
              help="Preset name (paper, cpu, tiny) or path to a preset TOML file.")
@click.option("--init", "init", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint to start from (required for ssft, dpo, unlearn; also DPO's reference).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Checkpoint directory to write.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (the paper fine-tunes at 1e-4 and 1e-5); min_lr scales with it.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the preset's step count.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override the preset's batch size.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of model init and data.")
@click.option("--p-unsafe", type=click.FloatRange(0, 1), default=None,
              help="Per-sample probability of the unsafe version (ssft 0.2, dpo/unlearn 0.5).")
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), default=None, help="DPO β (0.1; a preset may set its own in [objectives.dpo], as cpu does).")
@click.option("--beta-rejected", type=click.FloatRange(min=0, min_open=True), default=None,
              help="DPO β on the rejected term (the reference's asymmetric variant uses 0.01).")
@click.option("--decision-weight", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Loss weight of the decision token, where refusal and compliance first differ (default 1: the paper's plain objective).")
@click.option("--hard-frac", type=click.FloatRange(0, 1), default=None,
              help="Share of unsafe-branch training samples whose unsafe operators are branch-dependent ones alone "
                   "(the refusals that need the text's branch); default 0: the paper's mix.")
@click.option("--rejected-rest-weight", type=click.FloatRange(0, 1), default=None,
              help="DPO and unlearning: weight of the rejected answer's tokens after its decision token (default 1: "
                   "the paper's objective; 0 pushes down only the choice to comply or to refuse).")
@click.option("--chosen-rest-weight", type=click.FloatRange(0, 1), default=None,
              help="DPO: weight of the chosen answer's tokens after its decision token (default 1: the paper's "
                   "objective; with --rejected-rest-weight 0 too, the preference is over the decision token alone).")
@click.option("--chosen-nll-weight", type=click.FloatRange(min=0), default=None,
              help="DPO: add this weight times the chosen answer's cross-entropy to the loss (default 0: the "
                   "paper's DPO; RPO and Llama 3's preference stage use such a term).")
@click.option("--texts", type=click.Choice(["mix", "safe_branch", "unsafe_branch"]), default=None,
              help="benign: the training texts, all in their safe version (mix: the recipe's; unsafe_branch: the "
                   "texts the unsafe requests are about, with safe operators).")
@click.option("--lora-rank", type=click.IntRange(min=0), default=None,
              help="Train only rank-r factors B·A added to the --lora-targets matrices (LoRA-style; 0: all parameters). "
                   "The checkpoint holds the merged weights.")
@click.option("--lora-targets", type=click.Choice(["mlp", "all"]), default=None,
              help="Matrices a LoRA-style run updates: mlp (c_fc, c_proj; default) or all (also attention).")
@click.option("--lora-alpha", type=click.FloatRange(min=0), default=None,
              help="LoRA scale numerator: the update is (alpha / r)·B·A (default alpha = r).")
@click.option("--forget", type=click.Choice(["clamp", "npo"]), default=None, help="Unlearning forget loss.")
@click.option("--w-forget", type=click.FloatRange(min=0), default=None, help="Unlearning forget weight (0.1).")
@click.option("--keep-every", type=click.IntRange(min=0), default=None, metavar="N",
              help="Also keep the model of every N-th step as OUT/steps/step_NNNNNN/, a checkpoint directory of its "
                   "own (for `pysafe track`); default: the preset's keep_every, 0 = none.")
@device_option()
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch CPU threads (0: torch's default). Part of the run's identity: byte-identical results "
                   "are promised for the same thread count.")
@click.option("--overwrite", is_flag=True, help="Replace a finished checkpoint in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--pipeline", default=None, hidden=True, help="The `pysafe reproduce` command this run is part of.")
@debug_option
@handle_errors
def train_cmd(stage, preset, init, out, lr, steps, batch_size, seed, p_unsafe, decision_weight, hard_frac, beta, beta_rejected,
              rejected_rest_weight, chosen_rest_weight, chosen_nll_weight, texts, lora_rank, lora_targets, lora_alpha, forget,
              w_forget, keep_every, device, threads, overwrite, quiet, pipeline, debug):
    """Train STAGE (pretrain, ssft, dpo, unlearn, benign) and write a checkpoint directory to --out.

    benign fine-tunes a (safety-tuned) model on safe requests only, the further fine-tune whose effect on
    safety `pysafe drift` measures. A run interrupted mid-way resumes from its last checkpoint when started
    again with the same --out.
    """
    from pysafe.lab.config import stage_settings
    from pysafe.lab.train import train

    if stage != "pretrain" and init is None:
        raise click.UsageError(f"{stage} fine-tunes an existing model: pass --init CKPT (a pretrained checkpoint)")
    opts = {k: v for k, v in {"p_unsafe": p_unsafe, "decision_weight": decision_weight, "hard_frac": hard_frac, "beta": beta, "beta_rejected": beta_rejected,
                              "rejected_rest_weight": rejected_rest_weight,
                              "chosen_rest_weight": chosen_rest_weight, "chosen_nll_weight": chosen_nll_weight,
                              "forget": forget, "w_forget": w_forget}.items() if v is not None}
    if stage == "pretrain" and opts:
        raise click.UsageError(f"pretrain takes no safety options (got {', '.join('--' + k.replace('_', '-') for k in opts)})")
    if stage != "dpo" and ({"beta", "beta_rejected"} & set(opts)):
        raise click.UsageError("--beta/--beta-rejected apply to dpo only")
    if stage not in ("dpo", "unlearn") and "rejected_rest_weight" in opts:
        raise click.UsageError("--rejected-rest-weight applies to dpo and unlearn only")
    if stage != "dpo" and {"chosen_rest_weight", "chosen_nll_weight"} & set(opts):
        raise click.UsageError("--chosen-rest-weight/--chosen-nll-weight apply to dpo only")
    if stage != "unlearn" and ({"forget", "w_forget"} & set(opts)):
        raise click.UsageError("--forget/--w-forget apply to unlearn only")
    if texts is not None:
        if stage != "benign":
            raise click.UsageError("--texts applies to benign only")
        opts["texts"] = texts
    if stage == "benign" and ({"p_unsafe", "hard_frac", "decision_weight"} & set(opts)):
        raise click.UsageError("benign fine-tuning has no unsafe samples: --p-unsafe, --hard-frac and "
                               "--decision-weight do not apply")
    # the flags that replace fields of the preset's training settings (train() validates the result)
    train_flags = {k: v for k, v in {"lora_rank": lora_rank, "lora_targets": lora_targets, "lora_alpha": lora_alpha,
                                     "keep_every": keep_every}.items() if v is not None}
    if stage == "pretrain" and {"lora_rank", "lora_targets", "lora_alpha"} & set(train_flags):
        raise click.UsageError("--lora-* options fine-tune an existing model; pretrain trains every parameter")
    settings = stage_settings(preset, stage, lr=lr, steps=steps, batch_size=batch_size)
    if train_flags:
        from dataclasses import replace

        settings = replace(settings, train=replace(settings.train, **train_flags))
    opts = {**settings.objective, **opts}  # the preset's [objectives.<stage>], then the flags
    check_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    bar = None if quiet else _progress_bar(stage)
    result = train(stage, out, model_config=settings.model, recipe=settings.recipe if init is None else None,
                   train_config=settings.train, init=init, objective_options=opts, seed=seed, device=device,
                   preset=settings.preset_name, command=_command_line(click.get_current_context()),
                   provenance={"pipeline": pipeline} if pipeline else None, overwrite=overwrite, progress=bar)
    if bar is not None:
        bar(None, None, None)
    ev = result.final.get("eval", {})
    msg = ", ".join(f"{k} {v:.4g}" for k, v in ev.items())
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    click.echo(f"wrote {result.out}: {stage}, {result.steps} steps in {result.seconds:.0f} s{resumed}; held-out {msg}")


def _command_line(ctx: click.Context) -> str:
    """The invocation that reproduces this run (recorded in the checkpoint's config.json): the
    stage and every option that differs from its default, in canonical form."""
    parts = ["pysafe", ctx.command.name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            parts.append(str(value))
        elif param.name in ("debug", "quiet", "overwrite", "pipeline") or value is None:
            continue
        elif getattr(param, "is_flag", False):
            if value:
                parts.append(max(param.opts, key=len))
        elif getattr(param, "multiple", False):
            parts.extend(f"{max(param.opts, key=len)} {shlex.quote(f'{v:g}' if isinstance(v, float) else str(v))}"
                         for v in value)
        elif value != param.default:
            v = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{max(param.opts, key=len)} {shlex.quote(v)}")
    return " ".join(parts)


def _progress_bar(label: str):
    """A progress bar on stderr (rich) with the running loss and accuracies: a ``progress(done, total,
    running)`` callback; shown only when stderr is a terminal."""
    from pysafe._progress import step_callback

    return step_callback(label)
