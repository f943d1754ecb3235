"""Quality evaluation: WikiText-2 perplexity (`llmpress eval ppl`)."""
