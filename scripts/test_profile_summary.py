#!/usr/bin/env python3
"""Tests of scripts/profile_summary.py (run by hand: `python3 scripts/test_profile_summary.py`;
CI runs no Python). The samples in scripts/profile_samples/ were written for these tests in
the formats the tools write (an `ncu --csv` details page, a torch profiler Chrome trace),
not produced by the tools: see scripts/profile_samples/README.md."""
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_summary as ps  # noqa: E402

SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile_samples")


class Categories(unittest.TestCase):
    def test_our_kernels(self):
        cases = {
            "flash_attention_d128_w8_bf16": "attention",
            "scaled_softmax_bf16": "attention",
            "softmax_f32": "attention",
            "nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT": "GEMMs",
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMMs",
            "mul_mat_q8_0": "GEMMs",
            "modulated_layer_norm_bf16": "norms / modulation",
            "gated_residual_bf16": "norms / modulation",
            "qk_norm_rope_bf16": "norms / modulation",
            "rmsnorm_bf16": "norms / modulation",
            "ucopy_bf16": "copies",
            "copy2d_bf16": "copies",
            "cast_bf16_f32": "copies",
            "badd_bf16": "other",
            "add_row_bias_bf16": "other",
            "ugelu_bf16": "other",
            "im2col_bf16": "other",
        }
        for name, cat in cases.items():
            self.assertEqual(ps.category(name), cat, name)

    def test_torch_kernels(self):
        cases = {
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >(Flash_fwd_params)": "attention",
            "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
            "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(...)": "GEMMs",
            "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>(...)": "norms / modulation",
            "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)": "copies",
            "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>(...)": "copies",
            "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(...)": "other",
        }
        for name, cat in cases.items():
            self.assertEqual(ps.category(name), cat, name)


class FindForward(unittest.TestCase):
    FORWARD = ["emb", "gemm"] + ["norm", "qkv", "attn", "proj"] * 3 + ["single", "attn", "mlp"] * 4 + ["out"]

    def test_two_forwards_between_init_and_vae(self):
        init = ["randn", "cast"] * 30  # periodic: every even length repeats, none is primitive
        vae = ["conv", "gn", "silu"] * 5
        names = init + ["check"] + self.FORWARD * 2 + vae
        start, length = ps.find_forward(names, min_length=8)
        self.assertEqual(length, len(self.FORWARD))
        self.assertEqual(start, len(init) + 1 + len(self.FORWARD))

    def test_a_longer_repeated_vae_pass_loses_to_the_forward_by_its_attention_launches(self):
        # `bench flux --warmup 1` runs each VAE pass twice too; a pass may launch more
        # kernels than a forward, but it has one attention where the forward has one a block.
        vae = [f"conv{i}" for i in range(60)] + ["softmax_bf16"]
        forward = [n.replace("attn", "flash_attention_d128_w8_bf16") for n in self.FORWARD]
        names = ["init"] + forward * 2 + vae * 2
        start, length = ps.find_forward(names, min_length=8)
        self.assertEqual((start, length), (1 + len(forward), len(forward)))

    def test_a_shared_tail_shifts_the_repeat_left_onto_forward_launches(self):
        # The launch before the first forward has the forward's last name: the repeat also
        # holds one launch to the left, and that start is taken (its second copy holds
        # forward launches only).
        names = ["init", "out"] + self.FORWARD * 2 + ["vae"]
        start, length = ps.find_forward(names, min_length=8)
        self.assertEqual(length, len(self.FORWARD))
        self.assertEqual(start, 1 + len(self.FORWARD))
        self.assertEqual(sorted(names[start:start + length]), sorted(self.FORWARD))

    def test_one_forward_has_no_repeat_of_forward_length(self):
        # Identical blocks inside one forward repeat back to back, but are shorter than a
        # forward: with a floor above a block's length nothing is found.
        self.assertIsNone(ps.find_forward(["x"] + self.FORWARD + ["y"], min_length=8))

    def test_a_periodic_run_alone_is_no_forward(self):
        self.assertIsNone(ps.find_forward(["a", "b"] * 100, min_length=8))


class Samples(unittest.TestCase):
    def test_ncu_sample_forward(self):
        s = ps.summarise(os.path.join(SAMPLES, "ncu-bench-flux.csv"), "repeat", min_forward=8)
        self.assertEqual(s["launches"], 26)
        got = {c: (round(v["ms"] * 1e3, 6), v["launches"]) for c, v in s["categories"].items()}
        # Microseconds of the second (warm) forward in the sample, and its launches.
        self.assertEqual(got, {"attention": (180.0, 3), "GEMMs": (550.0, 9), "norms / modulation": (41.0, 10),
                               "copies": (8.0, 2), "other": (9.0, 2)})
        self.assertAlmostEqual(s["total_ms"], 0.788)

    def test_ncu_sample_without_a_forward_floor_it_can_meet(self):
        s = ps.summarise(os.path.join(SAMPLES, "ncu-bench-flux.csv"), "repeat")
        self.assertEqual(s["launches"], 71)
        self.assertTrue(any("no forward found" in n for n in s["notes"]))

    def test_torch_trace_sample(self):
        s = ps.summarise(os.path.join(SAMPLES, "torch-trace-diffusers.json"), "1")
        got = {c: (round(v["ms"] * 1e3, 6), v["launches"]) for c, v in s["categories"].items()}
        self.assertEqual(got, {"attention": (20.0, 1), "GEMMs": (55.0, 2), "norms / modulation": (8.0, 2),
                               "copies": (8.0, 2), "other": (11.0, 2)})
        self.assertTrue(any("1 memcpy" in n for n in s["notes"]))

    def test_raw_page_and_nsys_csv(self):
        raw = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
               '"Grid Size","Device","CC","gpu__time_duration.sum"\n'
               '"","","","","","","","","","","","nsecond"\n'
               '"0","1","p","h","nvjet_a","1","7","(1,1,1)","(1,1,1)","0","9.0","1,500"\n'
               '"1","1","p","h","ucopy_bf16","1","7","(1,1,1)","(1,1,1)","0","9.0","500"\n')
        nsys = ('Start (ns),Duration (ns),CorrId,GrdX,GrdY,GrdZ,BlkX,BlkY,BlkZ,Reg/Trd,StcSMem (MB),DymSMem (MB),'
                'Bytes (MB),Throughput (MB/s),SrcMemKd,DstMemKd,Device,Ctx,GreenCtx,Strm,Name\n'
                '100,2000,5,1,1,1,1,1,1,32,0,0,,,,,NVIDIA H100 (0),1,,7,flash_attention_d128_w8_bf16\n'
                '3000,700,6,,,,,,,,,,4,5000,Device,Device,NVIDIA H100 (0),1,,7,[CUDA memcpy Device-to-Device]\n')
        with tempfile.TemporaryDirectory() as d:
            for name, text in (("raw.csv", raw), ("nsys.csv", nsys)):
                with open(os.path.join(d, name), "w") as f:
                    f.write(text)
            r = ps.summarise(os.path.join(d, "raw.csv"), "1")
            self.assertEqual((r["categories"]["GEMMs"]["ms"], r["categories"]["copies"]["ms"]), (0.0015, 0.0005))
            n = ps.summarise(os.path.join(d, "nsys.csv"), "1")
            self.assertEqual((n["launches"], n["categories"]["attention"]["ms"]), (1, 0.002))

    def test_cli_writes_the_table_and_json(self):
        with tempfile.TemporaryDirectory() as d:
            md, js = os.path.join(d, "p.md"), os.path.join(d, "p.json")
            rc = ps.main(["--side", "ours", os.path.join(SAMPLES, "ncu-bench-flux.csv"), "repeat",
                          "--side", "diffusers", os.path.join(SAMPLES, "torch-trace-diffusers.json"), "1",
                          "--side", "missing", os.path.join(d, "none.csv"), "1",
                          "--min-forward", "8", "--out", md, "--json", js])
            self.assertEqual(rc, 0)
            with open(md) as f:
                text = f.read()
            self.assertIn("| **total** | **0.79** | **26** | 100% | **0.10** | **9** | 100% |", text)
            self.assertIn("missing: not summarised", text)
            with open(js) as f:
                self.assertEqual(sorted(json.load(f)), ["diffusers", "ours"])


if __name__ == "__main__":
    unittest.main()
