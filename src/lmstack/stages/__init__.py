"""lmstack.stages: the end-to-end jobs that sit on top of the library.

A stage composes the library packages (world, data, tokenizer, model, train, adapt, align, eval) into one
job with a time budget, and writes a run directory: its resolved config, data, model, metrics, scores and a
report. The library does the work; a stage only decides the order, the budgets and what is measured.

Stages (one module each):
    speedrun.py   `lmstack speedrun`: world -> data pipeline -> tokenizer -> pretrain -> eval -> SFT -> align
                  -> RAG -> report card, on a laptop CPU
    sft.py        the speedrun's SFT stage: fine-tune on the world's chat mix, score base vs SFT (sft_stage)
    align.py      the speedrun's alignment stage: DPO (+RPO NLL) then GRPO (math + safety reward, KL anchor),
                  measured before and after, with a validation guard (align_stage)
    rag.py        the speedrun's RAG stage: index the world's bios, write retrieval-formatted chats for the SFT
                  mix, score world QA closed-book against with retrieval (rag_stage)

The layering rule: library packages never import a stage. Only the CLI (lmstack.cli, whose STAGES table
routes `lmstack speedrun` here) and the stages themselves may; tests/test_layering.py scans every import
and fails on any other. Nothing is imported here, so importing one stage does not pull in the others.

Usage:
    lmstack speedrun --config recipes/speedrun.yaml
    from lmstack.stages.sft import sft_stage        # sft_stage(run_dir, base_model_dir, budget_s=120)
    from lmstack.stages.align import align_stage    # align_stage(run_dir, sft_model_dir, world_dir)
    from lmstack.stages.rag import rag_stage        # rag_stage(run_dir, {"sft": model_dir}, world, index)
"""
