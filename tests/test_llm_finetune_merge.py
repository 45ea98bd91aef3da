"""llm_finetune.merge: full-precision merge of a QLoRA adapter + trained head, verified against base+adapter."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_finetune.config import MergeConfig, TrainConfig
from llm_finetune.merge import check_memory, main, memory_needed, probe_batch
from tunerag.common import TuneragError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tied_run(tiny_llama_tied, sample_alpaca, tmp_path_factory) -> Path:
    """A 3-step QLoRA run of the tiny Llama with tied embeddings (SmolLM2's layout)."""
    from llm_finetune.train import main as train

    out = tmp_path_factory.mktemp("tied") / "run"
    train(TrainConfig(base_model=str(tiny_llama_tied), data=str(sample_alpaca), val_size=4, max_length=96,
                      max_steps=3, batch_size=2, grad_accum=1, lr=1e-2, eval_steps=3, save_steps=3, out=str(out)))
    return out


def adapter_logits(base: Path, adapter: Path, dtype=torch.float32):
    """Logits of base + adapter (not merged) on the merge probe batch, computed independently of merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(adapter)).eval()
    probe = probe_batch(tokenizer, "cpu")
    with torch.no_grad():
        return model(**probe).logits, probe


def merged_logits(folder: Path, probe, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model, model(**probe).logits


def test_merge_untied_mistral_verifies_reloads_and_generates(tiny_qlora_run, tiny_mistral, tmp_path):
    out = tmp_path / "merged"
    report = main(MergeConfig(adapter=str(tiny_qlora_run), out=str(out)))
    assert report["max_abs_logit_diff"] <= report["tolerance"] and report["head_max_abs_change"] > 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is gone

    expected, probe = adapter_logits(tiny_mistral, tiny_qlora_run)
    model, logits = merged_logits(out, probe)
    keep = probe["attention_mask"].bool()
    torch.testing.assert_close(logits[keep], expected[keep], atol=1e-4, rtol=1e-4)
    generated = model.generate(**probe, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, probe["input_ids"].shape[1] + 4)

    with pytest.raises(TuneragError, match="--overwrite"):
        main(MergeConfig(adapter=str(tiny_qlora_run), out=str(out)))
    main(MergeConfig(adapter=str(tiny_qlora_run), out=str(out), overwrite=True, max_shard_size="2MB"))
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, and still loads
    merged_logits(out, probe)


def test_merge_keeps_the_trained_head_of_a_tied_base(tied_run, tiny_llama_tied, tmp_path):
    out = tmp_path / "merged"
    main(MergeConfig(adapter=str(tied_run), out=str(out)))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    expected, probe = adapter_logits(tiny_llama_tied, tied_run)
    model, logits = merged_logits(out, probe)
    keep = probe["attention_mask"].bool()
    torch.testing.assert_close(logits[keep], expected[keep], atol=1e-4, rtol=1e-4)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)


def test_verification_fails_and_writes_nothing_when_the_merge_is_wrong(tied_run, tmp_path, monkeypatch):
    """peft 0.21 already unties a tied head it merges; the reload check is what guarantees it."""
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.unload())  # adapter dropped
    with pytest.raises(TuneragError, match="verification failed: the merged model's logits differ"):
        main(MergeConfig(adapter=str(tied_run), out=str(tmp_path / "m")))
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_merge_within_tolerance(tied_run, tmp_path):
    report = main(MergeConfig(adapter=str(tied_run), out=str(tmp_path / "bf16"), dtype="bfloat16"))
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_adapter_folder_errors(tiny_qlora_run, tmp_path):
    with pytest.raises(TuneragError, match="does not exist"):
        main(MergeConfig(adapter=str(tmp_path / "nope"), out=str(tmp_path / "m")))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_qlora_run / "adapter_config.json", partial)
    with pytest.raises(TuneragError, match="incomplete .*adapter_model.safetensors"):
        main(MergeConfig(adapter=str(partial), out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_refuses_another_base_and_a_quantized_base(tiny_qlora_run, tiny_llama_tied, tiny_mistral, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    with pytest.raises(TuneragError, match="another base .*model_type"):
        main(MergeConfig(adapter=str(tiny_qlora_run), out=str(tmp_path / "m"), base=str(tiny_llama_tied)))
    # a base of another size, with the recorded base gone: caught by the weight shapes
    wide = tmp_path / "wide"
    MistralForCausalLM(MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    moved = tmp_path / "moved_adapter"
    shutil.copytree(tiny_qlora_run, moved, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(TuneragError, match="made for another base .*size mismatch"):
        main(MergeConfig(adapter=str(moved), out=str(tmp_path / "m"), base=str(wide)))

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_mistral, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(TuneragError, match="quantized"):
        main(MergeConfig(adapter=str(tiny_qlora_run), out=str(tmp_path / "m"), base=str(quantized)))
    assert not (tmp_path / "m").exists()


def test_memory_estimate_and_refusal():
    gib = 2**30
    assert memory_needed(7_000_000_000, 0, "float32") > 26 * gib
    assert memory_needed(7_000_000_000, 0, "bfloat16") < memory_needed(7_000_000_000, 0, "float32") / 1.9
    with pytest.raises(TuneragError, match=r"needs about 26\.6 GiB .* only 4\.0 GiB .*--dtype bfloat16"):
        check_memory(memory_needed(7_000_000_000, 0, "float32"), 4 * gib, "float32", "cpu")
    check_memory(gib, 4 * gib, "float32", "cpu")


def test_cli_error_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "llm_finetune.merge", "--adapter", str(tmp_path / "none"),
                           "--out", str(tmp_path / "m")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: adapter folder") and "Traceback" not in done.stderr
