"""The quant-type table agrees with llama-cpp-python's own enum and refuses bad names."""

from __future__ import annotations

import llama_cpp
import pytest

from mathq.recipes.quants import (
    QUANT_TYPES,
    UnknownQuantError,
    Variant,
    get_quant,
    parse_quant_list,
    parse_variant,
    parse_variant_list,
)


@pytest.mark.parametrize("q", QUANT_TYPES, ids=lambda q: q.name)
def test_ftype_matches_llama_cpp(q):
    const = "LLAMA_FTYPE_ALL_F32" if q.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{q.name}"
    assert getattr(llama_cpp, const) == q.ftype


def test_every_llama_cpp_file_type_is_in_the_table_or_explained():
    names = {q.name for q in QUANT_TYPES}
    ftypes = {k.removeprefix("LLAMA_FTYPE_MOSTLY_") for k in dir(llama_cpp)
              if k.startswith("LLAMA_FTYPE_MOSTLY_")}
    # MXFP4_MOE only applies to mixture-of-experts tensors; NVFP4 has no CPU quantizer in
    # llama-quantize's list; the Q4_0_x_y repacks were removed from GGUF files.
    left_out = {"MXFP4_MOE", "NVFP4", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8"}
    assert ftypes - left_out <= names


def test_lookup_is_case_insensitive_and_knows_aliases():
    assert get_quant("q4_k_m").name == "Q4_K_M"
    assert get_quant("Q5_K").name == "Q5_K_M"
    assert [q.name for q in parse_quant_list("Q8_0, q4_k_m,Q8_0")] == ["Q8_0", "Q4_K_M"]


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownQuantError) as info:
        get_quant("Q4_KM")
    assert "Q4_K_M" in str(info.value)
    with pytest.raises(UnknownQuantError):
        parse_quant_list(" , ")


def test_imatrix_helps_the_k_and_i_quants_up_to_4_5_bits_and_every_type_needing_one():
    for q in QUANT_TYPES:
        low_bit_k_or_i = q.family in ("k", "i") and q.bpw <= 4.5
        assert q.imatrix_helps == (low_bit_k_or_i or q.requires_imatrix), q.name
    helped = {q.name for q in QUANT_TYPES if q.imatrix_helps}
    assert {"Q2_K", "Q3_K_M", "Q4_K_M", "Q4_K_S", "IQ4_XS", "IQ2_XXS"} <= helped
    assert not helped & {"Q8_0", "Q6_K", "Q5_K_M", "Q4_0", "BF16", "TQ2_0"}


def test_variant_names_carry_the_imatrix_suffix():
    assert parse_variant("q4_k_m-IMAT") == Variant(get_quant("Q4_K_M"), imatrix=True)
    assert parse_variant("Q4_K-imat").name == "Q4_K_M-imat"  # aliases still apply
    assert parse_variant(" Q8_0 ") == Variant(get_quant("Q8_0"))
    assert [v.name for v in parse_variant_list("Q4_K_M,Q4_K_M-imat, q4_k_m-imat,Q2_K")] == [
        "Q4_K_M", "Q4_K_M-imat", "Q2_K"]
    with pytest.raises(UnknownQuantError) as info:
        parse_variant("BF16-imat")
    assert str(info.value) == ("'BF16-imat': BF16 is not quantized, so it has no "
                               "importance-matrix variant (use BF16, or a quantized type "
                               "with -imat)")
    with pytest.raises(UnknownQuantError) as info:
        parse_variant("Q4_KM-imat")
    assert "Q4_K_M" in str(info.value)


@pytest.mark.parametrize(("name", "fix"), [("T4.85-tuned", "T4.85"),
                                           ("t4.85-IMAT-tuned", "t4.85-IMAT")])
def test_a_budget_name_with_the_tuned_suffix_says_it_is_tuned_already(name: str,
                                                                       fix: str) -> None:
    with pytest.raises(UnknownQuantError) as info:
        parse_variant(name)
    assert "tuned by definition" in info.value.message and info.value.hint == f"use {fix}"
