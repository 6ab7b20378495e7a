package frontend

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// The OpenAI-compatible request and response bodies, as much of them as a
// mock engine can honour. Unknown request fields are accepted and ignored,
// as OpenAI clients send many.

type completionRequest struct {
	Model         string          `json:"model"`
	Prompt        json.RawMessage `json:"prompt"`
	MaxTokens     *int            `json:"max_tokens"`
	Stream        bool            `json:"stream"`
	N             *int            `json:"n"`
	StreamOptions *streamOptions  `json:"stream_options"`
}

type chatRequest struct {
	Model               string         `json:"model"`
	Messages            []chatMessage  `json:"messages"`
	MaxTokens           *int           `json:"max_tokens"`
	MaxCompletionTokens *int           `json:"max_completion_tokens"`
	Stream              bool           `json:"stream"`
	N                   *int           `json:"n"`
	StreamOptions       *streamOptions `json:"stream_options"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

type completionChoice struct {
	Text         string  `json:"text"`
	Index        int     `json:"index"`
	Logprobs     any     `json:"logprobs"`
	FinishReason *string `json:"finish_reason"`
}

type completionResponse struct {
	ID      string             `json:"id"`
	Object  string             `json:"object"`
	Created int64              `json:"created"`
	Model   string             `json:"model"`
	Choices []completionChoice `json:"choices"`
	Usage   *usage             `json:"usage,omitempty"`
}

type chatDelta struct {
	Role    string `json:"role,omitempty"`
	Content string `json:"content"`
}

type chatChoice struct {
	Index        int        `json:"index"`
	Message      *chatDelta `json:"message,omitempty"`
	Delta        *chatDelta `json:"delta,omitempty"`
	Logprobs     any        `json:"logprobs"`
	FinishReason *string    `json:"finish_reason"`
}

type chatResponse struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []chatChoice `json:"choices"`
	Usage   *usage       `json:"usage,omitempty"`
}

type modelList struct {
	Object string      `json:"object"`
	Data   []modelCard `json:"data"`
}

type modelCard struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

type apiError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

// promptText reads a completion prompt: a string, or an array of one
// string. Token-id prompts are accepted as an array of integers.
func promptText(raw json.RawMessage, vocab uint32) (text string, ids []uint32, err error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil, errors.New("prompt is required")
	}
	if err := json.Unmarshal(raw, &text); err == nil {
		return text, nil, nil
	}
	var strs []string
	if err := json.Unmarshal(raw, &strs); err == nil {
		if len(strs) != 1 {
			return "", nil, fmt.Errorf("prompt: %d prompts given; this server takes one per request", len(strs))
		}
		return strs[0], nil, nil
	}
	var nums []int64
	if err := json.Unmarshal(raw, &nums); err == nil {
		if len(nums) == 0 {
			return "", nil, errors.New("prompt: empty token list")
		}
		ids = make([]uint32, len(nums))
		for i, n := range nums {
			if n < 0 || n >= int64(vocab) {
				return "", nil, fmt.Errorf("prompt: token %d at %d is outside the vocabulary (ids 0 to %d)", n, i, vocab-1)
			}
			ids[i] = uint32(n)
		}
		return "", ids, nil
	}
	return "", nil, errors.New("prompt must be a string, an array of one string, or an array of token ids")
}

// chatText flattens the messages into one prompt, the way a chat template
// would: each message on its own line, prefixed with its role.
func chatText(msgs []chatMessage) (string, error) {
	if len(msgs) == 0 {
		return "", errors.New("messages must hold at least one message")
	}
	var b strings.Builder
	for i, m := range msgs {
		switch m.Role {
		case "system", "developer", "user", "assistant", "tool":
		default:
			return "", fmt.Errorf("messages[%d].role %q is not system, developer, user, assistant or tool", i, m.Role)
		}
		content, err := messageContent(m.Content)
		if err != nil {
			return "", fmt.Errorf("messages[%d].content: %w", i, err)
		}
		b.WriteString(m.Role)
		b.WriteString(": ")
		b.WriteString(content)
		b.WriteByte('\n')
	}
	b.WriteString("assistant:")
	return b.String(), nil
}

// messageContent accepts a string or an array of text parts.
func messageContent(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("must be a string or an array of text parts")
	}
	var b strings.Builder
	for i, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("part %d has type %q; only text parts are supported", i, p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}
