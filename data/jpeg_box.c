/* Decode one box of a JPEG with libjpeg-turbo, and only as much of the file as the box needs.
 *
 * Why: a random-resized crop keeps about half of an image on average, and whole-file
 * decoding is most of the fast training transform's time. libjpeg-turbo can stop after the
 * box's last row (rows below it are never decoded), skip the inverse DCT and colour
 * conversion of rows above it (jpeg_skip_scanlines) and of columns left and right of it
 * (jpeg_crop_scanline). simplejpeg, Pillow and torchvision do not expose these calls, so
 * data/jpeg_box.py compiles this file and calls it through ctypes.
 *
 * Settings are simplejpeg's fastdct=True, fastupsample=True (the whole-file fast path), so
 * a box is the same pixels as that box of the whole decoded image.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

struct failure {
    struct jpeg_error_mgr manager; /* first, so that cinfo->err points at the whole struct */
    jmp_buf jump;
    char *message;
    int message_size;
};

static void fail(j_common_ptr cinfo) {
    struct failure *failure = (struct failure *)cinfo->err;
    char text[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, text);
    snprintf(failure->message, failure->message_size, "%s", text);
    longjmp(failure->jump, 1);
}

/* Warnings (level -1: corrupt or truncated data) fail too, like simplejpeg's strict mode,
   so that the caller hands a damaged file to Pillow, as the whole-file path does. Trace
   messages (level >= 0) are dropped rather than printed to stderr. */
static void warn(j_common_ptr cinfo, int level) {
    if (level < 0) fail(cinfo);
}

/* Decodes rows [top, top + height) of the image scaled by 1/scale (1, 2, 4 or 8), columns
   [left, left + width) at least. Row r of the result starts at out + r * (*row_width) * 3,
   RGB; the box's first column is column *box_column of each row (jpeg_crop_scanline
   widens the decoded columns to whole iMCUs). Returns 0, or 1 with a message. */
int decode_box(const unsigned char *data, unsigned long size, int scale, int top, int left, int height,
               int width, unsigned char *out, unsigned long capacity, int *row_width, int *box_column,
               char *message, int message_size) {
    struct jpeg_decompress_struct cinfo;
    struct failure failure;
    JSAMPROW rows[16];
    JDIMENSION first_column, columns;

    memset(&cinfo, 0, sizeof cinfo); /* a failure inside jpeg_create_decompress then destroys nothing */
    cinfo.err = jpeg_std_error(&failure.manager);
    failure.manager.error_exit = fail;
    failure.manager.emit_message = warn;
    failure.message = message;
    failure.message_size = message_size;
    if (setjmp(failure.jump)) goto failed; /* libjpeg's errors and warnings come back here */
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST;
    cinfo.do_fancy_upsampling = FALSE;
    cinfo.scale_num = 1;
    cinfo.scale_denom = scale;
    jpeg_start_decompress(&cinfo);
    if (top < 0 || left < 0 || height < 1 || width < 1 || (JDIMENSION)(top + height) > cinfo.output_height ||
        (JDIMENSION)(left + width) > cinfo.output_width) {
        snprintf(message, message_size, "box (top %d, left %d, height %d, width %d) is outside the %ux%u image",
                 top, left, height, width, cinfo.output_height, cinfo.output_width);
        goto failed;
    }
    first_column = (JDIMENSION)left;
    columns = (JDIMENSION)width;
    jpeg_crop_scanline(&cinfo, &first_column, &columns);
    if ((unsigned long)height * columns * 3 > capacity) {
        snprintf(message, message_size, "output buffer of %lu bytes is too small", capacity);
        goto failed;
    }
    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        snprintf(message, message_size, "could not skip to row %d", top);
        goto failed;
    }
    for (int done = 0; done < height;) {
        int count = height - done < 16 ? height - done : 16, read;
        for (int i = 0; i < count; i++) rows[i] = out + (size_t)(done + i) * columns * 3;
        read = (int)jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)count);
        if (read == 0) {
            snprintf(message, message_size, "no rows decoded after row %d", top + done);
            goto failed;
        }
        done += read;
    }
    *row_width = (int)columns;
    *box_column = left - (int)first_column;
    jpeg_destroy_decompress(&cinfo); /* the rows below the box are never decoded */
    return 0;

failed:
    jpeg_destroy_decompress(&cinfo);
    return 1;
}
