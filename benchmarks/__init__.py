"""`cmg_bench`: latency, throughput and accuracy comparisons measured side by side in one run."""
