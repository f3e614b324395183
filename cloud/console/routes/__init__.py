"""The console's pages, one router per area (sign-in, fleet, models, rollouts, learning, audit, admin)."""
