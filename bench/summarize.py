"""Print a table from a pytest-benchmark JSON: case, median ms, GB/s or TFLOP/s vs ceilings."""
import json
import sys


def main(path):
    data = json.load(open(path))
    rows = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        ms = e.get("median_ms", b["stats"]["median"] * 1e3)
        rate = ""
        if "gbps" in e:
            rate = f"{e['gbps']:.0f} GB/s ({100 * e['frac_of_copy_bw']:.0f}% of copy {e['copy_gbps']:.0f})"
        if "tflops" in e:
            rate += f" {e['tflops']:.1f} TFLOP/s (bf16 mm {e['bf16_tflops']:.0f})"
        rows.append((b["name"], f"{ms:.4f}", rate))
    w = max((len(r[0]) for r in rows), default=10)
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>10} ms  {r[2]}")


if __name__ == "__main__":
    main(sys.argv[1])
