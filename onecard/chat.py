"""`onecard chat`: talk to a chat model — an onecard SFT run or a nanochat chat checkpoint
(`chatsft_checkpoints/dNN`, read without unpickling code).

Interactive by default: the conversation is kept, `/clear` starts over, `/temperature T` and
`/topk K` change the sampling, `/quit` (or Ctrl-D) leaves; at a terminal Ctrl-C stops a reply, not
the program (at the prompt it drops the line being typed). `-p PROMPT` answers once and exits, for
scripts; there, and with messages piped in, Ctrl-C ends the command.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from onecard import defaults
from onecard.args import ONE_DECODE_STEP, add_threads_argument, fraction, positive_int, seed, temperature, text_arg
from onecard.errors import UsageError

HELP = "commands: /clear  /temperature T  /topk K  /quit   (Ctrl-C stops a reply)"
LEAVE = "Ctrl-D or /quit leaves"
EPILOG = ("Without -p it reads a message a line, typed or piped in (piped, stdout gets the replies alone, a reply "
          "after each message). In the chat: /clear starts a new conversation, "
          "/temperature T and /topk K change the sampling, /quit or Ctrl-D leaves; Ctrl-C stops a reply, and at the "
          "prompt drops the line (piped in or with -p, Ctrl-C ends the command). A conversation may run to 10x the "
          "context the model trained on, as nanochat's; past that context its replies degrade, and it says so.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("run_dir", nargs="?", type=text_arg,
                   help="an onecard SFT run or a nanochat chat checkpoint directory (default: the newest "
                        "`onecard sft` run under ./runs)")
    p.add_argument("-p", "--prompt", type=text_arg, help="answer this one message and exit")
    p.add_argument("--system", help="a system message, merged into the first user message as nanochat does")
    p.add_argument("--temperature", type=temperature, default=0.6, help="0 for greedy, at most 2 (default 0.6)")
    p.add_argument("--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens (default 50)")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling share (default 1: off)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="tokens per reply at most (default 512)")
    p.add_argument("--seed", type=seed, default=0,
                   help="the first reply draws from it, each later one from the next number (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="cpu, cuda or auto (default)")
    p.add_argument("--tokenizer", type=text_arg, help="tokenizer.pkl or directory, for a nanochat checkpoint kept "
                                                      "elsewhere")
    add_threads_argument(p, 1, "text is written one token at a time, and " + ONE_DECODE_STEP)


def newest_chat_run():
    from onecard.run import newest_run

    found = newest_run("sft")
    if found is None:
        raise UsageError("no `onecard sft` run under ./runs: give the run directory (onecard chat RUN_DIR)")
    return found


class Chat:
    """A conversation with the model: its messages, and replies streamed to `out`."""

    def __init__(self, engine, tokenizer, sampling, system: str | None, out=None) -> None:
        self.engine, self.tokenizer, self.sampling, self.system = engine, tokenizer, sampling, system
        self.out = out or sys.stdout
        self.messages: list[dict] = []
        self.warned = False  # said that the conversation went past the context the model trained on
        self.turns = 0  # replies so far: each draws from its own seed, --seed + turn (the same chat, the same replies)
        # what the first prompt holds: a --system message too long for the context is named, not the one typed
        self.first = "the system message and this message are" if system else "the message is"

    def past_training(self, tokens: int) -> None:
        """Say once a conversation that the model reads beyond the context it trained on."""
        trained = self.engine.model.config.sequence_len
        if tokens <= trained or self.warned:
            return
        self.warned = True
        what = "the conversation is now" if self.messages else self.first
        self.out.flush()
        print(f"note: {what} {tokens:,} tokens, past the {trained:,} the model trained on: expect its replies to "
              "degrade" + (" (/clear starts over)" if self.messages else ""), file=sys.stderr, flush=True)

    def reply(self, text: str, prefix: str = "", stoppable: bool = False) -> str:
        """Stream the reply to `text`, and keep both in the conversation. stoppable: Ctrl-C stops this
        reply and the chat goes on (a person at a terminal); else Ctrl-C ends the command."""
        from onecard.conversations import normalize, prompt_ids, reply_content, show_tool_calls

        messages = self.messages + [{"role": "user", "content": text}]
        if self.system:
            messages = [{"role": "system", "content": self.system}] + messages
        prompt = prompt_ids(self.tokenizer, normalize(messages, training=False))
        context = self.engine.model.rotary_len
        if len(prompt) >= context:
            raise UsageError(f"the conversation has outgrown the model's context of {context:,} tokens: /clear to "
                             "start over" if self.messages else
                             f"{self.first} {len(prompt):,} tokens, more than the model's context of {context:,}")
        self.past_training(len(prompt))
        self.out.write(prefix)
        pieces: list[str] = []

        def show(_sample: int, piece: str) -> None:
            pieces.append(piece)
            self.out.write(show_tool_calls(piece))
            self.out.flush()
        try:
            turn = replace(self.sampling, seed=(self.sampling.seed + self.turns) % 2**63)
            self.turns += 1
            produced = self.engine.complete(prompt, turn, on_text=show)
            room = context - len(prompt)  # the engine writes no further than the context
            if room < self.sampling.max_tokens and produced and len(produced[0]) >= room:
                self.out.write(" [cut: the model's context is full]")
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
            if not stoppable:  # piped in or -p: one Ctrl-C stops the command, not each reply in turn
                self.out.write("\n")
                raise
        self.out.write("\n")
        answer = "".join(pieces)  # the calculator's tokens go back into the history as the tokens they were
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply_content(answer)}]
        return answer

    def command(self, line: str, notes=None) -> bool:
        """Handle a /command, saying what it did on `notes` (default: the replies' stream); False to quit."""
        notes = notes or self.out
        name, _, value = line.partition(" ")
        try:
            if name == "/quit":
                return False
            if name == "/clear":
                self.messages, self.warned = [], False
                notes.write("(new conversation)\n")
            elif name == "/temperature":
                self.sampling.temperature = temperature(value)
                notes.write(f"(temperature {self.sampling.temperature:g})\n")
            elif name == "/topk":
                self.sampling.top_k = positive_int(value)
                notes.write(f"(top-k {self.sampling.top_k})\n")
            else:
                notes.write(f"(unknown command {name}; {HELP})\n")
        except argparse.ArgumentTypeError as error:
            notes.write(f"({name}: {error})\n")
        return True


def is_base_model(info: dict) -> bool:
    """A model that says it is a base model (an onecard pre-training run, nanochat's base_checkpoints/...)."""
    from onecard.run import model_phase

    return model_phase(info["path"]) == "base"


def run(args: argparse.Namespace) -> int:
    from onecard.device import resolve_device, use_threads
    from onecard.engine import Engine, Sampling
    from onecard.weights import load_weights

    if sys.stdout is None:  # started with `>&-`: the replies would have nowhere to go
        raise UsageError("standard output is closed: give the chat somewhere to write (a terminal, a file, a pipe)")
    device = resolve_device(args.device)
    use_threads(args.threads, device)
    model, tokenizer, info = load_weights(args.run_dir or newest_chat_run(), device, tokenizer_path=args.tokenizer)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        max_tokens=args.max_tokens, seed=args.seed)
    if is_base_model(info):
        print(f"note: {info['path']} is a base model, not fine-tuned on conversations (onecard sft): it continues "
              "text and knows no chat format, so expect replies that are not answers", file=sys.stderr)
    chat = Chat(Engine(model, tokenizer), tokenizer, sampling, args.system)
    if args.prompt:
        chat.reply(args.prompt)
        return 0
    print(f"chatting with {info['path']} ({info['layout']}, {defaults.model_name(model.config)}, trained on "
          f"{model.config.sequence_len:,} tokens of context); {HELP}",
          file=sys.stdout if sys.stdin.isatty() else sys.stderr)  # piped in: stdout holds the replies alone
    return talk(chat, sys.stdin)


def talk(chat: Chat, stdin) -> int:
    """The interactive loop: a message a line until /quit or the end of input."""
    at_terminal = stdin.isatty()
    if at_terminal:
        try:
            import readline  # noqa: F401  input() then edits the line (arrows, Ctrl-A) and recalls earlier ones
        except ImportError:  # Windows
            pass
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 are a message's U+FFFD, not a traceback
    you, model = ("you> ", "model> ") if at_terminal else ("", "")  # piped in: a reply a line, nothing else
    notes = None if at_terminal else sys.stderr  # piped in: what commands did, and errors, not among the replies
    while True:
        try:
            line = input(you).strip()
        except EOFError:
            if at_terminal:
                print()
            return 0
        except KeyboardInterrupt:
            if not at_terminal:  # piped in: Ctrl-C ends the command
                raise
            print(f"\n({LEAVE})")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line, notes):
                return 0
            continue
        try:
            chat.reply(line, model, stoppable=at_terminal)
        except UsageError as error:
            print(f"({error})", file=notes)
        except KeyboardInterrupt:  # before its first token (reading the message, the prefill)
            if not at_terminal:
                raise
            print(" [stopped]")
