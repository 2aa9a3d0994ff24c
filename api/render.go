package api

import (
	"strings"
	"time"

	"github.com/strata-llm/strata/pipeline"
)

// RenderChat is the prompt the chat endpoints give the model for msgs: card's chat template
// rendered with add_generation_prompt, less a leading BOS (the tokenizer adds its own). It
// lets a test or tool feed `strata run` exactly what a chat request feeds the swarm.
func RenderChat(card pipeline.ModelCard, msgs []map[string]any) (string, error) {
	prompt, err := newTemplates(time.Now).render(card.ChatTemplate, card.BOS, card.EOS, msgs)
	if err != nil {
		return "", err
	}
	if card.BOS != "" {
		prompt = strings.TrimPrefix(prompt, card.BOS)
	}
	return prompt, nil
}
