"""The text mathq runs models on: MATH/GSM8K problem sets and the bundled math corpus."""
