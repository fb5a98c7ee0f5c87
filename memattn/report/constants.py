"""Names and limits the report modules share."""

MANIFEST_FILE = "_memattn_scan.json"  # written by `memattn scan` next to its part files
NO_MODEL = "none"  # model="none" (--model none): no regeneration, no heat maps or entropy curves

# Score columns of the scan, in display order; higher means "more memorized" for the detection scores.
SCORE_LABELS = {
    "score_e": "E (step-1 attention entropy)",
    "wen_step1": "Wen (step-1 noise-difference norm)",
    "score_combined": "combined step-1 detector",
    "score_d": "D (full-generation score)",
    "bos_share": "BOS attention share (step 1)",
    "summary_share": "summary-token attention share (step 1)",
}
# Column headers of the top-prompts table (the long label is the header's tooltip). The shares are the
# first step's, as the scan measures them; the heat maps' percentages are over the whole regeneration.
SCORE_HEADERS = {
    "score_e": "E",
    "wen_step1": "Wen",
    "score_combined": "combined",
    "score_d": "D",
    "bos_share": "BOS share, step 1",
    "summary_share": "summary share, step 1",
}
# Scores a threshold may apply to, in the order they are tried when the results do not say which.
THRESHOLD_SCORES = ("score_e", "wen_step1", "score_combined", "score_d")
FLAGGED_COLOR, CLEAN_COLOR, UNKNOWN_COLOR = "#c0392b", "#2980b9", "#7f8c8d"
MAX_PROMPT_CHARS = 1000  # longer prompts are cut in the page (the table keeps them whole)
MAP_STEPS = 5  # denoising steps whose full attention maps are averaged for the overlays
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
