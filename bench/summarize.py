"""Print a table from a pytest-benchmark JSON: case, median ms (IQR), GB/s or TFLOP/s vs ceilings,
peak memory. A case whose correctness check failed is marked and shows no rate.

    python bench/summarize.py bench.json
"""
import json
import sys


def rows(data):
    out = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        ms = e.get("median_ms", b["stats"]["median"] * 1e3)
        iqr = e.get("iqr_ms", b["stats"].get("iqr", 0.0) * 1e3)
        if e.get("correct") is False:
            out.append((b["name"], f"{ms:.4f}", "", "CHECK FAILED: not reported"))
            continue
        rate = ""
        if "gbps" in e:
            rate = f"{e['gbps']:.0f} GB/s ({100 * e['frac_of_copy_bw']:.0f}% of copy {e['copy_gbps']:.0f})"
        if "tflops" in e:
            rate += f" {e['tflops']:.1f} TFLOP/s (bf16 mm {e['bf16_tflops']:.0f})"
        if "peak_mem_bytes" in e:
            rate += f"  peak {e['peak_mem_bytes'] / 2**20:.0f} MiB"
        out.append((b["name"], f"{ms:.4f}", f"{iqr:.4f}", rate.strip()))
    return out


def main(path):
    data = json.load(open(path))
    rs = rows(data)
    w = max((len(r[0]) for r in rs), default=10)
    for r in rs:
        print(f"{r[0]:<{w}}  {r[1]:>10} ms  (IQR {r[2]:>8})  {r[3]}")


if __name__ == "__main__":
    main(sys.argv[1])
