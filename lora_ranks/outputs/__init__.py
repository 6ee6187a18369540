"""Output folders that never take anything of the user's.

Two kinds of output, each checked in one line before anything is written:

* a **run folder** (``--out`` of demo, analyze, finetune, train, compare, check) is written *into*: only the
  top-level names of its flow's layout (``RUN_ENTRIES``) are written. It must be absent, empty, or a run folder of
  this tool (its marker says so). A non-empty folder of the user's is written into only with ``overwrite``, and
  even then none of the names the run writes may already be there unless an earlier run of this tool made them
  (the marker lists them): ``overwrite`` never replaces a file the tool did not write. Such a folder stays the
  user's (marker kind "foreign"): the next run asks again.
* a **folder output** (an adapter, an export, a model folder: ``_io.atomic_folder``) *replaces* its target whole
  when the target is absent, empty, or a folder output of this tool holding nothing but what the tool wrote (its
  marker lists the files). With ``overwrite`` it is also written into a folder that holds other files, the way
  ``save_pretrained`` writes: its files replace only the tool's own earlier files (by the marker's list); a file
  of the user's is never replaced, deleted or moved, and one the output would replace is refused by name.

Never, even with ``overwrite``: an output that is a file, a symbolic link (for folder outputs; a dangling one for
run folders), lies under a file, cannot be written, or is, contains or lies inside an input of the command (each
path compared as given and as resolved, so a link cannot hide one inside the other); a folder output into a run
folder, or a run into an adapter or model folder of this tool.

The marker is the file ``.lora-ranks`` (JSON: ``kind``, ``made_by``; "run" for a run folder the tool created,
"foreign" with the ``entries`` the tool made in a folder of the user's, "folder" with the ``content`` and the
``files`` of a folder output, "staging" in a folder output being written). A folder is the tool's only if its marker
says so: a folder that merely looks like an output of this tool (the same file names, an old layout) is the user's.

Run and foreign markers also list the documents (``_DOCUMENTS``: configs, reports, tables) the run wrote, with their
size and modification time (``files``), each added as it is written (``note_written``, called by every atomic
write), so a run killed outright leaves its list: a document edited or added since is the user's, and the next run
is refused. A run marker without that list (an earlier release's, or one made by hand) cannot tell the tool's
documents from the user's: a run into a folder holding any is refused. A folder marker that describes none of its
folder's files (``_describes_its_files``) is a file of the user's and is never rewritten.
"""

from .checks import RUN_ENTRIES, OutputFolderError, check_output_dir, check_replaceable, local_path, probe_writable
from .markers import MARKER, file_stats, folder_marker, foreign_files, read_marker, tool_files
from .runs import claim_output_dir, note_made, note_written, record_made_entries

__all__ = ["OutputFolderError", "MARKER", "RUN_ENTRIES", "check_output_dir", "claim_output_dir",
           "check_replaceable", "record_made_entries", "note_written", "note_made", "folder_marker", "file_stats",
           "read_marker", "tool_files", "foreign_files", "local_path", "probe_writable"]
