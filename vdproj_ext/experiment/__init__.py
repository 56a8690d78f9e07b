"""The experiment layer: V-DProj training runs, their checkpoints and their report.

    protocol     PROTOCOL, PRESET_SETTINGS, Settings, the stages, THE run table (RUNS)
    data         text -> tokens -> samples, splits, batches
    checkpoint   atomic writes, the typed training state, the checkpoint format and reader
    distributed  the process group (one process, or DDP under torchrun)
    loop         evaluate, and StageTrainer: one stage of a run with early stopping
    runner       a whole run, the runs of one process, the job runner over processes
    report       report.md and plots from results.json, merging results
    inference    loading a trained (or Hugging Face) model to generate with
    study        vdproj-study: the runs over seeds, ranks and data sizes (plan, run folders,
                 estimate, execution); study_stats (t quantile, intervals, paired
                 differences), study_analysis (the sweeps' statistics and verdicts),
                 study_report (study.json and its check), study_markdown, study_plots

It imports the models and ops layers, torch and the standard library, never vdproj_ext.cli.
Import the submodules directly; this package re-exports nothing.
"""
