"""rmt_runtime.cpuinfo on /proc/cpuinfo texts of three kinds of server CPU (first processor's
lines, as the kernel prints them; later processors repeat them and are ignored)."""
import pytest

from rmt_runtime.cpuinfo import cpu_info, describe, native_bf16, usable_cores

# Sapphire Rapids: AVX-512 with VNNI, BF16, FP16, AVX-VNNI and the three AMX flags.
XEON_AMX = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss \
ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni \
pclmulqdq ssse3 fma cx16 pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand \
hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 \
smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl \
xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd ida arat avx512vbmi umip pku ospke waitpkg \
avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear \
serialize amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities
bogomips\t: 4800.00

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2
"""

# Zen 4 (Genoa): AVX-512 with VNNI and BF16, no AVX-VNNI flag, no AMX.
EPYC_ZEN4 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf \
tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand \
hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch topoext perfctr_core invpcid_single \
ssbd perfmon_v2 ibrs ibpb stibp ibrs_enhanced vmmcall fsgsbase bmi1 avx2 smep bmi2 invpcid avx512f avx512dq rdseed \
adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 \
clzero xsaveerptr rdpru wbnoinvd arat avx512vbmi pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni \
avx512_bitalg avx512_vpopcntdq rdpid flush_l1d
bogomips\t: 5200.00
"""

# Neoverse V2 (Graviton4, Grace): no model name line; the part number names it.
NEOVERSE_V2 = """\
processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm sb paca pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 \
flagm2 frint svei8mm svebf16 i8mm bf16 dgh rng bti
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd4f
CPU revision\t: 1
"""

# Cortex-A57 (Jetson Nano): NEON only, no bf16.
CORTEX_A57 = """\
processor\t: 0
model name\t: ARMv8 Processor rev 1 (v8l)
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
CPU part\t: 0xd07
"""


@pytest.mark.parametrize("text, model, arch, isa, bf16", [
    (XEON_AMX, "Intel(R) Xeon(R) Platinum 8488C", "x86_64",
     ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"],
     True),
    (EPYC_ZEN4, "AMD EPYC 9R14 96-Core Processor", "x86_64", ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], True),
    (NEOVERSE_V2, "Neoverse-V2", "aarch64",
     ["asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "svebf16"], True),
    (CORTEX_A57, "ARMv8 Processor rev 1 (v8l)", "aarch64", ["asimd"], False),
], ids=["xeon-amx", "epyc-zen4", "neoverse-v2", "cortex-a57"])
def test_model_isa_and_bf16_from_a_cpuinfo_text(text, model, arch, isa, bf16):
    info = cpu_info(text)
    assert info == {"model": model, "arch": arch, "isa": isa, "cores": usable_cores()}
    assert native_bf16(info) is bf16


def test_the_printed_line_uses_the_common_names():
    assert describe(cpu_info(XEON_AMX)).startswith(
        "Intel(R) Xeon(R) Platinum 8488C (x86_64; AVX2, AVX-512F, AVX-512 VNNI, AVX-VNNI, AVX-512 BF16, AVX-512 FP16, "
        "AMX-TILE, AMX-BF16, AMX-INT8); ")
    assert describe(cpu_info(EPYC_ZEN4)).startswith("AMD EPYC 9R14 96-Core Processor (x86_64; AVX2, AVX-512F, "
                                                    "AVX-512 VNNI, AVX-512 BF16); ")
    assert "(aarch64; NEON, NEON FP16, DotProd, I8MM, BF16, SVE, SVE2, SVE BF16)" in describe(cpu_info(NEOVERSE_V2))
    assert describe(cpu_info("processor\t: 0\nmodel name\t: Old\nflags\t\t: sse sse2\n")).startswith(
        "Old (x86_64; none of AVX2/AVX-512/AMX)")


def test_an_unknown_arm_part_is_named_by_its_numbers_and_no_cpuinfo_is_not_an_error():
    text = "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0xc0\nCPU part\t: 0xac3\n"
    assert cpu_info(text)["model"] == "ARM implementer 0xc0 part 0xac3"
    empty = cpu_info("")
    assert empty["isa"] == [] and empty["model"] and empty["cores"] >= 1


def test_this_machine():
    info = cpu_info()
    assert info["model"] and info["cores"] == usable_cores() >= 1
    assert str(info["cores"]) in describe(info)
