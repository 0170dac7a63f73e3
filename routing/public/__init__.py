"""Public pages of admitted adapters (model cards) and of contributors who chose a public
profile: routing, because they show every app's data (the leaderboard's neighbour)."""
