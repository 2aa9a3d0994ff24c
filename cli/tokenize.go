package cli

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/shard"
)

func newTokenizeCommand() *cobra.Command {
	var model string
	var special, pieces bool
	cmd := &cobra.Command{
		Use:   "tokenize --model M [TEXT|-]",
		Short: "Print the token ids of a text, as the model's tokenizer cuts it",
		Long: `Prints the token ids of TEXT (or of standard input, with - or no argument) on one line,
separated by single spaces. Any GGUF with a vocabulary works, vocabulary-only files included.
BOS and EOS are added only with --special, as the model's add_bos_token/add_eos_token ask.
--pieces prints each token's text on a second line, quoted.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if model == "" {
				return fmt.Errorf("--model is required")
			}
			var text string
			if len(args) == 0 || args[0] == "-" {
				b, err := io.ReadAll(cmd.InOrStdin())
				if err != nil {
					return fmt.Errorf("read standard input: %w", err)
				}
				text = string(b)
			} else {
				text = args[0]
			}
			path, err := resolveModel(cmd.Context(), model, "")
			if err != nil {
				return err
			}
			tok, err := shard.LoadTokenizer(path)
			if err != nil {
				return err
			}
			ids, err := tok.Encode(text, special)
			if err != nil {
				return fmt.Errorf("tokenize: %w", err)
			}
			out := cmd.OutOrStdout()
			strs := make([]string, len(ids))
			for i, id := range ids {
				strs[i] = strconv.Itoa(int(id))
			}
			fmt.Fprintln(out, strings.Join(strs, " "))
			if pieces {
				for i, id := range ids {
					p, err := tok.Decode([]int32{id})
					if err != nil {
						return fmt.Errorf("detokenize %d: %w", id, err)
					}
					strs[i] = strconv.Quote(p)
				}
				fmt.Fprintln(out, strings.Join(strs, " "))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&model, "model", "", "GGUF file (a vocabulary-only one will do), Ollama model name or URL")
	f.BoolVar(&special, "special", false, "add BOS/EOS as the model asks")
	f.BoolVar(&pieces, "pieces", false, "print each token's text on a second line")
	return cmd
}
