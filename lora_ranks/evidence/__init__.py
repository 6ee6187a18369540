"""Evidence: do the chosen ranks serve the model? Fidelity curves and allocation comparisons.

    fidelity.py      KL of base + truncated delta to the fine-tuned model; held-out loss
    allocations.py   uniform / energy / budget allocations at equal trainable parameters
    sensitivity.py   do loss-aware spectra predict what truncating one module costs? (comparability check)
    comparison.py    the comparison's layout, data splits, configs and design digest (what the tasks call)
    fidelity_checks.py  each config's extracted adapter against the fine-tune; the comparability check
    report.py        the comparison's results as files: rows over seeds, paired differences, plots
    runs.py          one comparison row: train (lora-ranks or a peer), evaluate in the same process, count compute
    rows.py          what a row is (spec, evaluation, result), which rows a comparison runs, a row's key
    learning_rates.py  each row's rate: the choice over the tuning seeds, the grid's extension at an edge
    committed.py     rows committed to a results folder, read back by a rerun on a fresh clone
    peers.py         PEFT's LoRA variants and data-driven inits as rows (default, rslora, pissa, ..., adalora)
    compute.py       the FLOP formula: training and preparation compute of every row
    accuracy.py      exact-match accuracy of greedy-decoded responses
"""

from .allocations import allocation_configs, uniform_allocation
from .comparison import (
                       ComparisonLayout,
                       FidelityReport,
                       eval_examples,
                       run_fidelity_report,
                       split_records,
                       split_validation,
                       write_allocation_configs,
)
from .fidelity import (
                       DeltaBasis,
                       FidelityPoint,
                       ReferenceOutputs,
                       fidelity_sweep,
                       fidelity_to,
                       held_out_loss,
                       mean_and_std,
                       next_token_fidelity,
                       reference_outputs,
)
from .fidelity_checks import (
                       ComparabilityReport,
                       FidelityTable,
                       allocation_fidelity,
                       comparability_check,
                       evaluate_adapter,
                       full_finetune_loss,
)
from .report import ComparisonReport, comparison_report, preparation_of
from .sensitivity import ModuleSensitivity, module_sensitivities, spearman

__all__ = ["FidelityPoint", "next_token_fidelity", "ReferenceOutputs", "reference_outputs", "fidelity_to",
           "DeltaBasis", "fidelity_sweep", "held_out_loss", "mean_and_std", "uniform_allocation", "allocation_configs",
           "ComparisonLayout", "ComparisonReport", "FidelityReport", "FidelityTable", "ComparabilityReport",
           "allocation_fidelity", "comparability_check", "comparison_report", "eval_examples",
           "evaluate_adapter", "full_finetune_loss", "run_fidelity_report", "split_records", "write_allocation_configs",
           "preparation_of", "split_validation",
           "ModuleSensitivity", "module_sensitivities", "spearman"]
