"""The public leaderboard: stored scoreboards, admitted adapters' evaluation results and
usage, read for a page and its API (routing, because it shows every app's data)."""
