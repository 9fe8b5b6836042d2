"""`safetyscope synth audit DATA -o OUT`: keep/drop per SFT pair, with reasons and scores."""

from __future__ import annotations

import click

from ..synthesis.audit import AuditConfig
from .options import field_default, overwrite_option, recorded_kwargs, recorded_model_options, user_errors


def _none(value):
    return None if value in (None, "", "none") else value


@click.command("audit")
@click.argument("data")
@click.option("-o", "--output", required=True,
              help="DATA with the audit columns added (audit_verdict, audit_reasons, scores): .jsonl, .parquet, "
                   ".csv or a directory.")
@click.option("--kept", "kept_path", default=None, help="Also write the kept rows only (DATA's columns) here.")
@click.option("--prompt-column", default=AuditConfig.prompt_column, show_default=True,
              help="Column with the request (user turn); not used when the table has a messages column.")
@click.option("--completion-column", default=AuditConfig.completion_column, show_default=True,
              help="Column with the response (assistant turn); not used when the table has a messages column.")
@click.option("--messages-column", default=AuditConfig.messages_column, show_default=True,
              help="Chat turns, read when the prompt/completion columns are absent (last user turn, last answer).")
@click.option("--label-column", default=AuditConfig.label_column, show_default=True,
              help="harmful/benign (or 1/0); 'none' = the request judge labels the rows.")
@click.option("--lang-column", default=AuditConfig.lang_column, show_default=True,
              help="Claimed language per row, checked against both texts when present ('none' = skip).")
@click.option("--judge", "request_judge", default=AuditConfig.request_judge, show_default=True,
              help="Request judge: a classifier (name or JSON; flagged = harmful), or llm:MODEL, qwen3guard:MODEL, "
                   "llamaguard:MODEL (a served model, see --judge-endpoint) judging request and response.")
@click.option("--response-judge", default=AuditConfig.response_judge, show_default=True,
              help="Classifier on the response (flagged = refusal).")
@click.option("--request-form", default=field_default(AuditConfig, "request_form"), show_default=True,
              help="Classifier flagging prompts that are not user requests ('none' = the instruction-echo and length tests only).")
@click.option("--judge-endpoint", default=None, help="OpenAI-compatible server of an LLM judge, e.g. http://127.0.0.1:8001/v1.")
@click.option("--judge-backend", type=click.Choice(["transformers", "vllm", "openai"]), default=None,
              help="Backend of an LLM judge [default: openai with --judge-endpoint, else transformers].")
@click.option("--contexts", "contexts_path", default=None,
              help="A targets JSON whose examples a prompt must not copy (synthesis shows them to the generator).")
@click.option("--near-dup", type=float, default=AuditConfig.near_dup, show_default=True,
              help="5-gram Jaccard above which a later prompt is a near copy of an earlier one.")
@click.option("--max-perplexity", type=float, default=AuditConfig.max_perplexity, show_default=True,
              help="Either text more perplexing than this under the model is degenerate.")
@click.option("--min-gain", type=float, default=AuditConfig.min_gain, show_default=True,
              help="A benign answer whose mean log-prob per token gains at most this from its prompt is off topic.")
@click.option("--min-user-role", type=float, default=AuditConfig.min_user_role, show_default=True,
              help="A prompt whose mean log-prob per token as a user turn exceeds that as an assistant turn by less "
                   "than this is no request.")
@click.option("--no-language-check", is_flag=True, help="Do not compare the languages of prompt, response and lang.")
@overwrite_option
@recorded_model_options("classifiers")
@user_errors
def audit(data, output, kept_path, prompt_column, completion_column, messages_column, label_column, lang_column,
          request_judge, response_judge, request_form, judge_endpoint, judge_backend, contexts_path, near_dup,
          max_perplexity, min_gain, min_user_role, no_language_check, overwrite, **kw):
    """Screen an SFT table (ours or yours): keep/drop per pair, the reasons, the scores, a summary per reason."""
    from ..data import read_table, write_table
    from ..generators import GeneratorConfig
    from ..outputs import check_output
    from ..provenance import write_document
    from ..synthesis.audit import audit_pairs, format_summary, load_judges, pairs_from_frame

    cfg = AuditConfig(prompt_column=prompt_column, completion_column=completion_column, messages_column=messages_column,
                      label_column=_none(label_column), lang_column=_none(lang_column), request_judge=request_judge,
                      response_judge=response_judge, request_form=_none(request_form), near_dup=near_dup,
                      max_perplexity=max_perplexity, min_gain=min_gain, min_user_role=min_user_role,
                      check_language=not no_language_check)
    check_output(output, inputs=[data], overwrite=overwrite)
    if kept_path:
        check_output(kept_path, inputs=[data], overwrite=overwrite)
    df = read_table(data)
    prompts, responses, labels, langs = pairs_from_frame(df, cfg, data)
    contexts = []
    if contexts_path:
        from ..synthesis.targets import read_targets

        contexts = [e["text"] for t in read_targets(contexts_path)["targets"] for e in t.get("examples", [])]
    gen = GeneratorConfig(backend=judge_backend or ("openai" if judge_endpoint else "transformers"),
                          endpoint=judge_endpoint, device=kw.get("device"), dtype=kw.get("dtype") or "auto")
    judges = load_judges(cfg, judge_gen=gen, **recorded_kwargs(kw))
    frame, summary = audit_pairs(prompts, responses, labels, langs, judges, cfg, contexts=contexts, progress=True)
    clash = [c for c in frame.columns if c in df.columns]
    out = df.drop(clash).hstack(frame)
    from ..data import table_format

    if table_format(output, for_writing=True) == "csv":  # CSV has no list cells: the reasons as "a;b"
        out = out.with_columns(out["audit_reasons"].list.join(";"))
    write_table(out, output)
    if kept_path:
        write_table(df.filter(frame["audit_verdict"] == "keep"), kept_path)
    summary.update(data=str(data), output=str(output), kept_output=kept_path)
    write_document({"format": "safetyscope-audit-summary", **summary}, f"{output}.summary.json")
    click.echo(f"{format_summary(summary)}; wrote {output} (summary: {output}.summary.json)"
               + (f", kept rows: {kept_path}" if kept_path else ""), err=True)
    if not summary["kept"] and summary["rows"]:
        click.echo("note: no row was kept; audit_reasons in the output say why each was dropped", err=True)
