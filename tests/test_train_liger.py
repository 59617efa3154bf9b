"""Paper H.3's Liger kernels per family: what is applied, and what is not covered named with its reason.

liger-kernel is a GPU package: the mapping (cdlib.training.models.liger_plan) is pure and checked here without it;
a run records what was and was not applied in its metrics and log.
"""

from __future__ import annotations

import pytest

from cdlib.training import models as TM
from cdlib.tiny import FAMILIES

STUDENTS = {"qwen3_5": ["rms_norm", "glu"], "llama": ["rms_norm", "rope", "glu"], "gpt_oss": ["rms_norm", "rope"]}


@pytest.mark.parametrize("family", sorted(STUDENTS))
def test_each_student_family_gets_what_liger_supports_and_names_the_rest(family):
    applied, missing = TM.liger_plan(str(FAMILIES[family]["model_type"]))
    assert applied == STUDENTS[family]
    assert set(applied) | set(missing) == set(TM.LIGER_KERNELS) == {"rms_norm", "rope", "glu", "gated_rms_norm"}
    assert not set(applied) & set(missing) and all(missing.values())


def test_qwen3_5_is_not_sent_rope_which_liger_refuses_and_unknown_types_name_every_kernel():
    assert "rope" in TM.liger_plan("qwen3_5_moe_text")[1] and "gated_rms_norm" in TM.liger_plan("qwen3_5")[1]
    applied, missing = TM.liger_plan("qwen2")
    assert applied == [] and set(missing) == set(TM.LIGER_KERNELS) and "'qwen2'" in missing["rope"]


def test_a_run_records_the_kernels_not_covered(tmp_path):
    from cdlib import train as T
    from cdlib.params import GenerateParams, ToyParams, TrainParams
    import cdlib.generate

    gen = tmp_path / "gen"
    cdlib.generate.run(GenerateParams(out_dir=str(gen), toy=ToyParams(n_train=20)))
    said: list[str] = []
    m = T.run(TrainParams(out_dir=str(tmp_path / "t"), data=str(gen), liger_kernels=True, max_steps=1, seq_len=1024,
                          gradient_checkpointing=False, tiny_layers=1), progress=False,
              log=lambda *a: said.append(" ".join(map(str, a))))
    assert m["liger_kernels"].startswith("off")
    assert set(m["liger_not_covered"]) == set(TM.LIGER_KERNELS)
    assert any("liger_kernels: off" in line for line in said)
