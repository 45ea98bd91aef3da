"""llm_finetune.train on the tiny random Mistral with real bitsandbytes 4-bit NF4 layers, on the CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm_finetune.config import TrainConfig
from llm_finetune.train import CHECKPOINTS, last_complete_checkpoint, load_qlora_model, main
from tunerag.common import TuneragError

REPO = Path(__file__).resolve().parent.parent


def small_cfg(tiny_mistral, sample_alpaca, out, **overrides):
    values = dict(base_model=str(tiny_mistral), data=str(sample_alpaca), val_size=8, max_length=128, max_steps=6,
                  batch_size=2, grad_accum=1, lr=1e-2, eval_steps=3, save_steps=3, logging_steps=1, out=str(out))
    return TrainConfig(**{**values, **overrides})


def test_qlora_model_is_4bit_with_trainable_float32_head(tiny_mistral, sample_alpaca, tmp_path):
    import bitsandbytes as bnb

    model = load_qlora_model(small_cfg(tiny_mistral, sample_alpaca, tmp_path), str(tiny_mistral), cuda=False)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4" and q_proj.base_layer.weight.quant_state.nested
    head = [p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert head and all(p.dtype == torch.float32 for p in head)
    trainable = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert trainable == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert json.loads(json.dumps(model.peft_config["default"].base_model_name_or_path)) == str(tiny_mistral.resolve())


def lora_grads(folder, quantized: bool, fixed: bool = True):
    """LoRA gradients after an evaluation pass, for the 4-bit model or a float32 reference holding
    the same (dequantized) weights."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from llm_finetune.train import bnb_config, disable_cpu_inference_packing

    q = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(torch.float32), dtype=torch.float32)
    if quantized:
        model = q
        if fixed:
            disable_cpu_inference_packing(model)
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        layers = dict(q.named_modules())
        for name, module in model.named_modules():
            if isinstance(layers.get(name), bnb.nn.Linear4bit):
                w = layers[name].weight
                module.weight.data = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    model = get_peft_model(model, lora)
    x = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():  # an evaluation before training, as train.py does for the perplexity before
        model(input_ids=x)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_gradients_match_a_dequantized_reference(tiny_mistral):
    """LoRA gradients through bitsandbytes' CPU 4-bit kernels equal those through float32 layers holding
    the same dequantized weights, also after an evaluation pass: the 4-bit backward is right, not just running."""
    reference = lora_grads(tiny_mistral, quantized=False)
    for name, grad in lora_grads(tiny_mistral, quantized=True).items():
        assert reference[name].abs().max() > 0
        torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4)
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():  # the bitsandbytes behaviour disable_cpu_inference_packing exists for
        unfixed = lora_grads(tiny_mistral, quantized=True, fixed=False)
        assert any(not torch.allclose(g, reference[n], atol=1e-5, rtol=1e-4) for n, g in unfixed.items())


def test_training_lowers_loss_and_writes_the_run_folder(tiny_qlora_run):
    names = {p.name for p in tiny_qlora_run.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "run_config.json", "metrics.json",
            "tokenizer_config.json", "tokenizer.json", CHECKPOINTS} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary folder left behind
    metrics = json.loads((tiny_qlora_run / "metrics.json").read_text())
    assert metrics["global_step"] == 6
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.05
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert [e["step"] for e in metrics["curves"]["eval"]] == [0, 3, 6]
    assert len(metrics["curves"]["train"]) == 6 and metrics["train_tokens"] > 0
    assert metrics["trainable_params"] < metrics["total_params"]
    from safetensors import safe_open

    with safe_open(tiny_qlora_run / "adapter_model.safetensors", "pt") as f:
        head = [k for k in f.keys() if "lm_head" in k]
        assert head and f.get_tensor(head[0]).dtype == torch.float32  # the trained head is in the adapter
    run_config = json.loads((tiny_qlora_run / "run_config.json").read_text())
    assert run_config["max_steps"] == 6 and run_config["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_resume_continues_at_the_right_step_with_the_same_losses(tiny_qlora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_qlora_run, run)
    shutil.rmtree(run / CHECKPOINTS / "checkpoint-6")
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json"):
        (run / name).unlink()
    # a half-written later checkpoint (no trainer_state.json) must never be picked
    half = run / CHECKPOINTS / "checkpoint-9"
    shutil.copytree(run / CHECKPOINTS / "checkpoint-3", half)
    (half / "trainer_state.json").unlink()
    assert last_complete_checkpoint(run).name == "checkpoint-3"

    cfg = json.loads((tiny_qlora_run / "run_config.json").read_text())
    metrics = main(TrainConfig(**{**cfg, "out": str(run), "resume": True}))
    assert metrics["global_step"] == 6 and not half.exists()
    first = {e["step"]: e["loss"] for e in json.loads((tiny_qlora_run / "metrics.json").read_text())["curves"]["train"]}
    resumed = {e["step"]: e["loss"] for e in metrics["curves"]["train"]}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # same data order, optimizer, scheduler and RNG: the same losses
        assert resumed[step] == pytest.approx(first[step], abs=1e-4)


def test_out_and_resume_errors(tiny_qlora_run, tiny_mistral, sample_alpaca, tmp_path):
    with pytest.raises(TuneragError, match="already holds a run"):
        main(small_cfg(tiny_mistral, sample_alpaca, tiny_qlora_run))
    with pytest.raises(TuneragError, match="no complete checkpoint"):
        main(small_cfg(tiny_mistral, sample_alpaca, tmp_path / "empty", resume=True))


def default_sigint():
    """In the child before exec: tests started in the background (`cmd &` in a script) inherit SIGINT
    ignored, and exec keeps it ignored, so Ctrl-C would never reach the training."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_train_cli(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen([sys.executable, "-m", "llm_finetune.train", *args], cwd=REPO, env=env, text=True, **kwargs)


def test_cli_bad_input_is_one_line(tmp_path):
    proc = run_train_cli(["--base-model", str(tmp_path / "nope"), "--data", "data/finance_alpaca.json",
                          "--out", str(tmp_path / "o")])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: LLM folder") and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_names_the_last_checkpoint(tiny_mistral, sample_alpaca, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file, not a pipe: a child whose progress bars fill a pipe would block
        proc = run_train_cli(["--base-model", str(tiny_mistral), "--data", str(sample_alpaca), "--val-size", "4",
                              "--max-length", "96", "--max-steps", "100000", "--batch-size", "1", "--grad-accum", "1",
                              "--eval-steps", "100000", "--save-steps", "2", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=default_sigint)
        deadline = time.time() + 240
        while last_complete_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "last complete checkpoint" in err and "--resume" in err
    assert last_complete_checkpoint(out) is not None


@pytest.mark.slow
def test_data_parallel_under_accelerate_launch_two_cpu_processes(tiny_mistral, sample_alpaca, tmp_path):
    """Two processes in one gloo group (torchrun via `accelerate launch --multi_gpu`): each sees half the data."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "llm_finetune.train", "--base-model", str(tiny_mistral), "--data", str(sample_alpaca),
           "--val-size", "8", "--max-length", "96", "--max-steps", "2", "--batch-size", "1", "--grad-accum", "1",
           "--eval-steps", "2", "--save-steps", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.world_size == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast and paged 8-bit AdamW need CUDA")
def test_cuda_bf16_training_keeps_a_float32_head_and_still_runs(tiny_mistral, sample_alpaca, tmp_path):
    out = tmp_path / "cuda"
    metrics = main(small_cfg(tiny_mistral, sample_alpaca, out, max_steps=2, eval_steps=2, save_steps=2))
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.bf16 and args.optim.value == "paged_adamw_8bit"
    assert metrics["eval_loss_after"] == metrics["eval_loss_after"]  # a forward pass after training, not NaN
